"""Converting checkpoints between formats: HF safetensors, `pytorch_model.bin`, `tf_model.h5`,
`flax_model.msgpack`, and the original ParlAI `*.pt` pickles.

A conversion is one read and one write. The reader (`checkpoint.open_weights`, or `checkpoint_parlai` for
ParlAI files) describes every tensor from the file headers, checked against the config before anything is
allocated; the writer loads, writes and drops one tensor at a time, so a conversion never holds two copies
of the model (see `benchmarks/benchmark_convert_memory.py`). No framework is needed except where a format
is a framework's own: pickles need torch, writing msgpack needs flax, h5 needs h5py.

Target formats are a registry, `WRITERS` ({name: Writer}): a new target is one entry whose `write`
fills a folder from {Hugging Face name: tensor}; `convert_checkpoint` gives every target the same
guarantees (the destination written whole into a temporary folder and swapped in, refused if not empty
unless `force`, tokenizer files copied, optional dtype cast and progress bar). `verify_conversion`
compares the logits of source and result in their own frameworks.

    >>> from blenderbot_mb.convert import convert_checkpoint
    >>> convert_checkpoint("path/to/hf-folder", "path/to/out", to="flax")        # doctest: +SKIP
    >>> convert_checkpoint("blender.pt", "out", allow_pickle=True)              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    FLAX_WEIGHTS_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_NAME,
    TF_WEIGHTS_NAME,
    WEIGHT_FILES,
    StoredTensor,
    load_tensor,
    open_weights,
    parse_size,
    weights_file_name,
    write_safetensors,
)
from .config import CONFIG_NAME, BlenderbotConfig
from .errors import CheckpointError, ConfigError, InputError
from .fileio import copy_confined, folder_transaction, holds_files
from .generation_config import GENERATION_CONFIG_NAME, GenerationConfig
from .naming import base_architecture

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
DEFAULT_ARCHITECTURE = "BlenderbotForConditionalGeneration"
DTYPES = ("float32", "float16", "bfloat16")


# ---------------------------------------------------------------------- target formats
@dataclass(frozen=True)
class Writer:
    """A target format: its main file, the framework that runs it, and `write(tensors, folder, config,
    architecture, max_shard_size)` that writes {Hugging Face name: tensor} into `folder`."""

    file_name: str
    framework: str  # the backend `verify_conversion` runs the result in
    write: Callable[..., None]


def _write_safetensors(tensors, folder, config, architecture, max_shard_size):
    write_safetensors(tensors, folder, max_shard_size=max_shard_size)


def _write_pickle(tensors, folder, config, architecture, max_shard_size):
    from .checkpoint_pickle import write_pickle

    write_pickle(tensors, os.path.join(folder, PT_WEIGHTS_NAME))


def _write_h5(tensors, folder, config, architecture, max_shard_size):
    from .checkpoint_h5 import write_tf_h5

    write_tf_h5(tensors, os.path.join(folder, TF_WEIGHTS_NAME), config, architecture)


def _write_msgpack(tensors, folder, config, architecture, max_shard_size):
    from .checkpoint_msgpack import write_flax_msgpack

    write_flax_msgpack(tensors, os.path.join(folder, FLAX_WEIGHTS_NAME), config, architecture)


WRITERS: dict[str, Writer] = {
    "safetensors": Writer(SAFE_WEIGHTS_NAME, "torch", _write_safetensors),
    "pt": Writer(PT_WEIGHTS_NAME, "torch", _write_pickle),
    "tf": Writer(TF_WEIGHTS_NAME, "tf", _write_h5),
    "flax": Writer(FLAX_WEIGHTS_NAME, "flax", _write_msgpack),
}
FORMATS = {name: writer.file_name for name, writer in WRITERS.items()}
SOURCE_FRAMEWORKS = {writer.file_name: writer.framework for writer in WRITERS.values()}


# ---------------------------------------------------------------------- the one entry point
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str = "safetensors",
                       allow_pickle: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       from_parlai: bool | None = None, tokenizer: str | os.PathLike | None = None,
                       force: bool = False, dtype: str | None = None, progress: bool = False,
                       check: Callable[[str], None] | None = None) -> str:
    """Convert the checkpoint at `src` (a model folder, a hub id or a ParlAI `*.pt` file) into folder `dst`.

    to: a name in `WRITERS`: "safetensors" (sharded above `max_shard_size`), "pt" (`pytorch_model.bin`),
        "tf" (`tf_model.h5`) or "flax" (`flax_model.msgpack`).
    allow_pickle: pickles (`pytorch_model.bin`, ParlAI files) are read only when this is True.
    from_parlai: read `src` as a ParlAI original; None guesses (a file that is not an HF weight file).
    tokenizer: a folder to copy tokenizer files from (default: the source folder, if it has them).
    force: replace an existing non-empty `dst` (without it, such a folder is refused).
    dtype: cast the floating-point weights to "float32", "float16" or "bfloat16"; a value beyond the
        target's range is refused (CheckpointError naming the tensor) rather than written as infinity.
    progress: show a progress bar (tqdm, on stderr) when the conversion takes more than a moment.
    check: called with the written temporary folder before it replaces `dst` (e.g. `verify_conversion`);
        an exception it raises leaves `dst` as it was.

    dst receives config.json, generation_config.json (when there are settings to keep), the weights,
    and the tokenizer files, all written into a temporary folder beside `dst` and swapped in whole when
    complete (`fileio.folder_transaction`): a failed or killed conversion leaves `dst` as it was. Returns dst.
    """
    if to not in WRITERS:
        raise InputError(f"unknown target format {to!r}; choose one of: {', '.join(WRITERS)} (exports to onnx, "
                         "savedmodel and ctranslate2: blenderbot_mb.export.export_model)")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    parse_size(max_shard_size)
    src, dst = os.fspath(src), os.fspath(dst)
    check_destination(dst, force, src)
    if tokenizer is not None:
        check_tokenizer_folder(os.fspath(tokenizer))
    with open_source(src, allow_pickle, from_parlai) as source:
        tensors = {name: _numpy_tensor(t) for name, t in source.tensors.items()}
        if dtype is not None:
            tensors = {name: cast_tensor(name, t, dtype) for name, t in tensors.items()}
        with _progress(tensors, progress, f"{os.path.basename(os.path.abspath(dst))} ({to})") as tensors:
            with folder_transaction(dst, refuse_non_empty=not force) as tmp:
                WRITERS[to].write(tensors, tmp, source.config, source.architecture, max_shard_size)
                source.config.replace(architectures=[source.architecture]).save_pretrained(tmp)
                if source.generation is not None:
                    source.generation.save_pretrained(tmp)
                copy_tokenizer_files(os.fspath(tokenizer) if tokenizer is not None else source.folder, tmp)
                if check is not None:
                    check(tmp)
    return dst


def check_destination(dst: str, force: bool, src: str | None = None) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless `force` (checked again under the
    folder's lock when writing), or one that is the source or holds it (`force` would delete the source)."""
    dst = os.path.realpath(dst)  # a link names its target (a dangling one: the folder to create)
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst} is a file, not a folder; pass a folder to write the model into")
    if src is not None and os.path.lexists(src):
        if os.path.commonpath([os.path.realpath(src), dst]) == dst:
            raise InputError(f"{dst} is the source {src} or holds it: writing there would replace the source. "
                             "Choose another output folder")
    if not force and os.path.isdir(dst) and holds_files(dst):
        raise CheckpointError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")


# ---------------------------------------------------------------------- sources
@dataclass
class Source:
    folder: str  # where tokenizer files are looked for
    config: BlenderbotConfig
    architecture: str
    generation: GenerationConfig | None
    tensors: dict[str, Any]  # {Hugging Face name: StoredTensor or array}, checked against the config
    file_name: str  # the weight file's name ("parlai" for a ParlAI original)


def is_parlai_file(src: str) -> bool:
    return os.path.isfile(src) and os.path.basename(src) not in WEIGHT_FILES and not src.endswith(".safetensors")


@contextlib.contextmanager
def open_source(src: str, allow_pickle: bool = False, from_parlai: bool | None = None) -> Iterator[Source]:
    """The checkpoint at `src`, checked, its tensors described but not loaded (files open until the block ends)."""
    if from_parlai if from_parlai is not None else is_parlai_file(src):
        from .checkpoint_parlai import read_parlai_checkpoint

        config, generation, tensors = read_parlai_checkpoint(src, allow_pickle=allow_pickle)
        yield Source(os.path.dirname(os.path.abspath(src)), config, DEFAULT_ARCHITECTURE, generation, tensors,
                     "parlai")
        return
    folder, config, arch = read_folder_config(src, allow_pickle)
    with open_weights(folder, config, arch, framework="numpy", allow_pickle=allow_pickle) as tensors:
        generation = None
        if os.path.lexists(os.path.join(folder, GENERATION_CONFIG_NAME)):
            generation = GenerationConfig.from_pretrained(folder, config)
        yield Source(folder, config, arch, generation, tensors, weights_file_name(folder))


def read_folder_config(src: str, allow_pickle: bool = False) -> tuple[str, BlenderbotConfig, str]:
    """(folder, config, architecture) of a model folder, a weight file inside one, or a hub id."""
    from .hub import resolve_folder

    if os.path.isfile(src) and (os.path.basename(src) in WEIGHT_FILES or src.endswith(".safetensors")):
        src = os.path.dirname(os.path.abspath(src))
    folder = resolve_folder(src, allow_pickle=allow_pickle)
    config = BlenderbotConfig.from_json_file(os.path.join(folder, CONFIG_NAME))
    archs = config.extra.get("architectures") or [DEFAULT_ARCHITECTURE]
    if isinstance(archs, str):  # a bare name where a list belongs
        archs = [archs]
    try:
        arch = base_architecture(archs[0])
    except ValueError as e:
        raise ConfigError(f"{os.path.join(folder, CONFIG_NAME)}: {e}") from None
    return folder, config, arch


def read_numpy_weights(folder: str, config, architecture: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The folder's weights, loaded as numpy arrays (PyTorch names and layout), checked against the config."""
    with open_weights(folder, config, architecture, framework="numpy", allow_pickle=allow_pickle) as tensors:
        return {name: to_numpy(load_tensor(t)) for name, t in tensors.items()}


def _stored(t, dtype: str, fn: Callable[[Any], Any]) -> StoredTensor:
    """`t` (a StoredTensor or an array) read through `fn` when loaded."""
    return StoredTensor(tuple(int(d) for d in t.shape), dtype, lambda: fn(load_tensor(t)))


def _numpy_tensor(t) -> StoredTensor:
    return _stored(t, t.dtype if isinstance(t, StoredTensor) else np.asarray(t).dtype.name, to_numpy)


def to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # a torch tensor from a pickle
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def cast_tensor(name: str, t: StoredTensor, dtype: str) -> StoredTensor:
    """`t` cast to `dtype` when loaded; a finite value beyond the target's range raises CheckpointError."""
    import ml_dtypes

    largest = float(ml_dtypes.finfo(_numpy_dtype(dtype)).max)

    def cast(value: np.ndarray) -> np.ndarray:
        if value.dtype.name == dtype:
            return value
        wide = value.astype(np.float64) if value.dtype.itemsize < 8 else value
        finite = np.abs(wide[np.isfinite(wide)])
        peak = float(finite.max()) if finite.size else 0.0
        if peak > largest:
            raise CheckpointError(f"tensor {name} holds {peak:.6g}, beyond the largest {dtype} ({largest:.6g}); "
                                  f"casting it would overflow to infinity. Keep a wider dtype.")
        return value.astype(_numpy_dtype(dtype))

    return _stored(t, dtype, cast)


@contextlib.contextmanager
def _progress(tensors: dict[str, StoredTensor], enabled: bool, label: str):
    """The same tensors, each ticking a tqdm bar (bytes) when loaded; the bar shows after a second only."""
    if not enabled:
        yield tensors
        return
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, delay=1.0, leave=False,
              disable=not sys.stderr.isatty()) as bar:  # a bar in a log file is noise
        def ticking(t: StoredTensor) -> StoredTensor:
            def read():
                value = t.load()
                bar.update(t.nbytes)
                return value

            return StoredTensor(t.shape, t.dtype, read)

        yield {name: ticking(t) for name, t in tensors.items()}


def check_tokenizer_folder(folder: str) -> None:
    """A folder given for the tokenizer files must hold some (a wrong path would silently write none)."""
    if not os.path.isdir(folder):
        raise InputError(f"--tokenizer {folder}: no such folder")
    if not any(os.path.lexists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise InputError(f"--tokenizer {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def copy_tokenizer_files(src_folder: str, dst_folder: str) -> list[str]:
    """Copy the tokenizer files `src_folder` holds; none may be a symlink out of it (`fileio.copy_confined`)."""
    if not os.path.isdir(src_folder) or os.path.abspath(src_folder) == os.path.abspath(dst_folder):
        return []
    return [name for name in TOKENIZER_FILES if copy_confined(src_folder, name, dst_folder)]


# ---------------------------------------------------------------------- verification
# the largest max |logit difference| accepted between source and result, relative to max(1, max |logit|).
# float32: two frameworks round differently, and that difference grows with the model's depth and its
# logits (a random d_model-512 model of 4 + 4 layers, weights of std 0.2: float32 logits 4e-5 of the largest
# from float64's, PyTorch against TensorFlow 8e-5); a wrong tensor moves the logits by far more. float16 and bfloat16: the
# rounding of the weights to that dtype.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
BACKENDS = ("torch", "tf", "flax")


@dataclass
class Verification:
    src_backend: str
    dst_backend: str
    max_abs_diff: float
    token_agreement: float  # share of positions whose argmax token is the same
    tolerance: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and (self.dtype != "float32" or self.token_agreement == 1.0)

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verify {verdict}: {self.src_backend} (source) vs {self.dst_backend} (result), {self.dtype}: "
                f"max |logit difference| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
                f"greedy tokens agree at {100 * self.token_agreement:.1f}% of positions")


def _available(backend: str) -> str:
    """`backend` if its framework is installed, else the first installed one."""
    import importlib.util

    modules = {"torch": "torch", "tf": "tensorflow", "flax": "flax"}
    for name in (backend, *BACKENDS):
        if importlib.util.find_spec(modules[name]) is not None:
            return name
    raise InputError("--verify runs the models: install torch, tensorflow or flax (pip install 'blenderbot-mb[torch]')")


def _framework(architecture: str, preferred: str | None) -> str:
    """The backend that runs a format's files: PyTorch for what only PyTorch has (BlenderbotForCausalLM)."""
    return "torch" if architecture == "BlenderbotForCausalLM" or preferred is None else preferred


def _batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = min(12, config.max_position_embeddings)
    ids = rng.integers(4, config.vocab_size, (2, length))
    ids[:, -1] = config.eos_token_id
    decoder = rng.integers(4, config.vocab_size, (2, min(8, config.max_position_embeddings)))
    decoder[:, 0] = config.decoder_start_token_id
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64),
            "decoder_input_ids": decoder.astype(np.int64)}


def model_logits(backend: str, folder: str | None, batch: dict, allow_pickle: bool = False,
                 config=None, tensors: Mapping[str, Any] | None = None,
                 architecture: str = DEFAULT_ARCHITECTURE) -> np.ndarray:
    """float32 logits of the model in `folder` (or of `config` + `tensors`, PyTorch only) run by `backend`.
    A BlenderbotForCausalLM (PyTorch only, as in the reference) reads the batch's decoder ids."""
    if architecture == "BlenderbotForCausalLM":
        if backend != "torch":
            raise InputError("--verify of a BlenderbotForCausalLM needs torch: only PyTorch has that class")
        import torch

        from .torch import BlenderbotForCausalLM

        model = BlenderbotForCausalLM.from_pretrained(folder, allow_pickle=allow_pickle).eval()
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(batch["decoder_input_ids"])).logits.float().numpy()
    if backend == "torch":
        import torch

        from .torch import BlenderbotForConditionalGeneration

        if folder is None:
            model = BlenderbotForConditionalGeneration(config).eval()
            state = {k: torch.from_numpy(np.asarray(to_numpy(load_tensor(v)), dtype=np.float32))
                     for k, v in tensors.items()}
            model.load_state_dict(state, strict=False)
            model.tie_weights()
        else:
            model = BlenderbotForConditionalGeneration.from_pretrained(folder, allow_pickle=allow_pickle)
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    if backend == "tf":
        from .tf import TFBlenderbotForConditionalGeneration

        model = TFBlenderbotForConditionalGeneration.from_pretrained(folder, allow_pickle=allow_pickle)
        return np.asarray(model(**batch, training=False).logits, dtype=np.float32)
    from .flax import FlaxBlenderbotForConditionalGeneration

    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, allow_pickle=allow_pickle)
    return np.asarray(model(**batch).logits, dtype=np.float32)


def verify_conversion(src: str, dst: str, to: str = "safetensors", allow_pickle: bool = False,
                      from_parlai: bool | None = None, dtype: str | None = None) -> Verification:
    """Run the same inputs through the source (in its format's framework) and the converted folder `dst`
    (in `to`'s framework; another installed framework where that one is not) and compare float32 logits.

    The tolerance is float32's unless the conversion cast the weights (`dtype`) to a narrower type.
    """
    with open_source(os.fspath(src), allow_pickle, from_parlai) as source:
        batch = _batch(source.config)
        if source.file_name == "parlai":
            if _available("torch") != "torch":
                raise InputError("--verify of a ParlAI checkpoint needs torch")
            src_backend = "torch"
            a = model_logits("torch", None, batch, config=source.config, tensors=source.tensors)
        else:
            src_backend = _available(_framework(source.architecture, SOURCE_FRAMEWORKS.get(source.file_name)))
            a = model_logits(src_backend, source.folder, batch, allow_pickle, architecture=source.architecture)
        cast = dtype is not None and any(t.dtype != dtype for t in source.tensors.values())
    dst_backend = _available(_framework(source.architecture, WRITERS[to].framework))
    b = model_logits(dst_backend, os.fspath(dst), batch, allow_pickle=allow_pickle or to == "pt",
                     architecture=source.architecture)
    dtype = dtype if cast else "float32"
    scale = max(1.0, float(np.abs(a).max()))
    return Verification(src_backend, dst_backend, float(np.abs(a - b).max()),
                        float(np.mean(a.argmax(-1) == b.argmax(-1))), TOLERANCES[dtype] * scale, dtype)
