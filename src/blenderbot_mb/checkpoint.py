"""Checkpoint files in Hugging Face layout: reading, checking against the config, and writing.

The default format is safetensors (`model.safetensors`, or shards plus `model.safetensors.index.json`
above `max_shard_size`). Each file format has one module that reads and writes it, its tensor names
derived from `naming.tensor_specs`: `checkpoint_safetensors`, `checkpoint_h5` (Hugging Face's
`tf_model.h5`), `checkpoint_msgpack` (`flax_model.msgpack`), `checkpoint_pickle` (`pytorch_model.bin`,
read only with an explicit `allow_pickle=True`, through `torch.load(weights_only=True)`) and
`checkpoint_parlai` (the original ParlAI files).

Readers describe each tensor from the file's header first (`StoredTensor`: shape, dtype, and a `load()`
that reads it), so names, shapes and dtypes are checked against the config (`match_weights`) before any
tensor is allocated, and a conversion can stream tensor by tensor. Every file read is first checked by
`fileio.checked_file` (a regular file inside the model's folder). Tensors are opaque objects with a
`.shape`: the backends pass their framework name and get their own tensors back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, ConfigError
from .fileio import checked_file, folder_transaction
from .naming import base_architecture, tensor_specs, tied_aliases
from .validation import check_weight_dtypes

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
TF_WEIGHTS_NAME = "tf_model.h5"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", as save_pretrained's default and the reference's
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, FLAX_WEIGHTS_NAME, TF_WEIGHTS_NAME, PT_WEIGHTS_NAME,
                PT_WEIGHTS_INDEX_NAME)
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
_DTYPE_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1}


def is_model_file(name: str) -> bool:
    """Whether a file name is part of a saved model (config, weights of any format, shards): the files a
    save replaces, so no file of another format survives beside the new ones."""
    return name in CONFIG_FILES or name in WEIGHT_FILES or _SHARD.fullmatch(name) is not None


# ---------------------------------------------------------------------- tensors in files
@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a weight file, described by the file's header; `load()` reads it (PyTorch layout)."""

    shape: tuple[int, ...]
    dtype: str  # numpy-style name: float32, bfloat16, int64, ...
    read: Callable[[], Any]

    def load(self):
        return self.read()

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


def dtype_size(dtype: str) -> int:
    if dtype not in _DTYPE_SIZES:
        raise CheckpointError(f"unsupported tensor dtype {dtype!r}")
    return _DTYPE_SIZES[dtype]


def load_tensor(t):
    return t.load() if isinstance(t, StoredTensor) else t


# ---------------------------------------------------------------------- sizes
def parse_size(size: int | str) -> int:
    """'5GB' -> bytes (decimal units as the reference: 1GB = 10**9; 'GiB' = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    s = str(size).strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    number, mult = s, 1
    for unit, m in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)].strip(), m
            break
    try:
        value = int(float(number) * mult)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ConfigError(f"invalid size {size!r}: give a positive number of bytes or a size such as 500MB, 5GB, 2GiB")
    return value


def _nbytes(t) -> int:
    if isinstance(t, StoredTensor):
        return t.nbytes
    if hasattr(t, "nbytes"):
        n = t.nbytes
        return int(n() if callable(n) else n)
    if hasattr(t, "numel"):  # torch
        return t.numel() * t.element_size()
    size = 1
    for dim in t.shape:
        size *= int(dim)
    return size * t.dtype.size


# ---------------------------------------------------------------------- reading
def export_kind(folder: str) -> str | None:
    """The runtime export a folder holds ("onnx", "savedmodel", "ctranslate2", as `convert --to` writes them), or
    None: such a folder has a model's config and tokenizer but no checkpoint weights."""
    try:
        if os.path.isdir(os.path.join(folder, "onnx")) and any(
                name.endswith(".onnx") for name in os.listdir(os.path.join(folder, "onnx"))):
            return "onnx"
        entries = [os.path.join(folder, name) for name in os.listdir(folder)]
    except OSError:
        return None
    for path in filter(os.path.isdir, entries):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "savedmodel"
        if os.path.isfile(os.path.join(path, "model.bin")) and \
                os.path.isfile(os.path.join(path, "shared_vocabulary.json")):
            return "ctranslate2"
    return None


EXPORTS = {"onnx": "an ONNX export, for onnxruntime (blenderbot_mb.export.ort)",
           "savedmodel": "a SavedModel export, for TensorFlow (tf.saved_model.load)",
           "ctranslate2": "a CTranslate2 export, for ctranslate2.Translator"}


def weights_file_name(folder: str) -> str:
    """The name of the weight file a folder holds, by the reference's order of preference."""
    for name in WEIGHT_FILES:
        if os.path.lexists(os.path.join(folder, name)):
            return name
    kind = export_kind(folder)
    if kind is not None:
        raise CheckpointError(
            f"{folder} is {EXPORTS[kind]}, not a checkpoint (docs/export.md): load, convert or export the "
            "checkpoint it was made from")
    raise CheckpointError(
        f"no weights in {folder}: expected one of {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{FLAX_WEIGHTS_NAME}, {TF_WEIGHTS_NAME}, {PT_WEIGHTS_NAME}"
    )


def find_weights_file(folder: str) -> str:
    """The resolved path of the folder's weight file (a hub snapshot's file is a blob with another name)."""
    return checked_file(folder, weights_file_name(folder), "weights file")


def read_index(index_path: str, folder: str) -> tuple[dict[str, str], list[str]]:
    """(weight map, checked shard paths) of a shard index: every shard a plain file name inside `folder`."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    shards = [checked_file(folder, shard, f"shard named in {os.path.basename(index_path)}")
              for shard in sorted(set(weight_map.values()))]
    return weight_map, shards


def open_sharded(index_path: str, folder: str, open_file: Callable[[str], dict]) -> dict[str, Any]:
    """The tensors of every shard an index names; each tensor the index lists must be in its shard."""
    weight_map, shards = read_index(index_path, folder)
    tensors: dict[str, Any] = {}
    for shard_path in shards:
        tensors.update(open_file(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"shards of {index_path} lack tensors the index lists: {', '.join(missing)}")
    return tensors


def open_raw(folder: str, config, framework: str = "numpy", allow_pickle: bool = False,
             stack: contextlib.ExitStack | None = None) -> tuple[str, dict[str, Any]]:
    """(path, {name in the file's own Hugging Face naming: StoredTensor}) of a folder's weights, unchecked."""
    path = find_weights_file(folder)
    name = weights_file_name(folder)
    if name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        from .checkpoint_safetensors import open_safetensors

        if name == SAFE_WEIGHTS_NAME:
            return path, open_safetensors(path, framework)
        return path, open_sharded(path, folder, lambda p: open_safetensors(p, framework))
    if name == TF_WEIGHTS_NAME:
        from .checkpoint_h5 import open_tf_h5

        return path, open_tf_h5(path, config, stack if stack is not None else contextlib.ExitStack())
    if name == FLAX_WEIGHTS_NAME:
        from .checkpoint_msgpack import open_flax_msgpack

        return path, open_flax_msgpack(path, config)
    from .checkpoint_pickle import open_pickle

    if name == PT_WEIGHTS_NAME:
        return path, open_pickle(path, allow_pickle)
    return path, open_sharded(path, folder, lambda p: open_pickle(p, allow_pickle))


@contextlib.contextmanager
def open_weights(folder: str, config, architecture: str, framework: str = "numpy",
                 allow_pickle: bool = False) -> Iterator[dict[str, Any]]:
    """The folder's weights, checked against the config from the file headers alone, in canonical names
    ({name: StoredTensor}); files stay open until the block ends. `read_weights` loads them all; a
    conversion loads them one at a time."""
    with contextlib.ExitStack() as stack:
        path, raw = open_raw(folder, config, framework, allow_pickle, stack)
        yield match_weights(raw, config, architecture, source=path)


def _writable(a):
    """A contiguous array torch may share: read-only ones (msgpack's, memory-mapped files') are copied."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def read_weights(folder: str, config, architecture: str, framework: str = "numpy",
                 allow_pickle: bool = False) -> dict[str, Any]:
    """Read the folder's weights and return them checked, in canonical names (see `match_weights`)."""
    with open_weights(folder, config, architecture, framework, allow_pickle) as stored:
        weights = {name: load_tensor(t) for name, t in stored.items()}
    import numpy as np

    if framework == "pt":  # h5 and msgpack files arrive as numpy arrays
        import torch

        weights = {k: torch.from_numpy(_writable(v)) if isinstance(v, np.ndarray) else v for k, v in weights.items()}
    elif framework == "numpy":  # pickles arrive as torch tensors (bf16 widened: numpy has none)
        weights = {k: v.detach().cpu().float().numpy() if hasattr(v, "detach") else v for k, v in weights.items()}
    return weights


# ---------------------------------------------------------------------- from_pretrained
UNSUPPORTED_KWARGS = {
    "device_map": "the model loads on one device; move it afterwards (PyTorch: device= or model.to(device))",
    "max_memory": "the model loads on one device; there is no device map",
    "offload_folder": "the model loads on one device; there is no offloading",
    "quantization_config": "quantization is not supported; load in a float dtype (dtype=)",
    "load_in_8bit": "quantization is not supported; load in a float dtype (dtype=)",
    "load_in_4bit": "quantization is not supported; load in a float dtype (dtype=)",
    "attn_implementation": "each backend has one attention implementation (PyTorch: scaled_dot_product_attention)",
    "low_cpu_mem_usage": "weights are always read once, without a randomly initialized copy; drop the argument",
    "trust_remote_code": "this package runs no code from model repositories",
    "from_pt": "drop it: every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are, "
               "and a pytorch_model.bin pickle with allow_pickle=True (only from a source you trust)",
    "from_tf": "drop it: every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are",
    "from_flax": "drop it: every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are",
    "use_safetensors": "safetensors is always preferred; pickles load only with allow_pickle=True",
    "ignore_mismatched_sizes": "a checkpoint must match its config; mismatches are listed by name",
    "output_loading_info": "loading either succeeds completely or lists every mismatch in the error",
    "subfolder": "pass the folder itself (a local path) instead",
    "variant": "weight file variants are not read",
}


def split_pretrained_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """`from_pretrained` keyword arguments -> (config overrides, generation setting overrides).

    Config field names override the config, generation setting names (`num_beams=`, ...) the generation
    config, as the reference's kwargs do. transformers options this package does not offer, and any other
    name, raise ConfigError naming the argument: nothing unknown reaches config.json.
    """
    from .config import BlenderbotConfig
    from .generation_config import GenerationConfig

    config_fields = set(BlenderbotConfig.field_names()) | {"return_dict"}
    generation_fields = set(GenerationConfig.field_names()) - config_fields
    for name in kwargs:
        if name in UNSUPPORTED_KWARGS:
            raise ConfigError(f"from_pretrained does not support {name}=: {UNSUPPORTED_KWARGS[name]}")
        if name not in config_fields | generation_fields:
            raise ConfigError(
                f"from_pretrained got an unknown keyword argument {name!r}; it takes hub options "
                "(revision, cache_dir, local_files_only, token, force_download), config fields "
                "(e.g. add_cross_attention=False) and generation settings (e.g. num_beams=4)"
            )
    return ({k: v for k, v in kwargs.items() if k in config_fields},
            {k: v for k, v in kwargs.items() if k in generation_fields})


def load_pretrained(name_or_path, architecture: str, framework: str, config=None, allow_pickle: bool = False,
                    **kwargs):
    """What every backend's `from_pretrained` starts from: (config, weights, generation_config).

    `name_or_path` is a local folder or a hub id (hub options such as `revision`, `cache_dir`,
    `local_files_only` are taken from `kwargs`); the other keyword arguments override config fields, as
    in the reference (`add_cross_attention=False`), or generation settings (`num_beams=4`); anything else
    raises (see `split_pretrained_kwargs`). Weights come back checked, in canonical names and PyTorch
    layout, as `framework` tensors (see `read_weights`).
    """
    from .config import BlenderbotConfig, as_config
    from .generation_config import GenerationConfig
    from .hub import pop_hub_kwargs, resolve_folder

    hub_kwargs = pop_hub_kwargs(kwargs)
    config_overrides, generation_overrides = split_pretrained_kwargs(kwargs)
    folder = resolve_folder(name_or_path, allow_pickle=allow_pickle, **hub_kwargs)
    config = as_config(config) if config is not None else BlenderbotConfig.from_pretrained(folder)
    if config_overrides:
        config = config.replace(**config_overrides)
    weights = read_weights(folder, config, architecture, framework=framework, allow_pickle=allow_pickle)
    generation_config = GenerationConfig.from_pretrained(folder, config)
    if generation_overrides:
        generation_config = generation_config.update(**generation_overrides)
    return config, weights, generation_config


# tensors a checkpoint may lack: the reference initializes them (final_logits_bias: zeros), e.g. when a
# BlenderbotModel file is loaded into BlenderbotForConditionalGeneration
OPTIONAL_TENSORS = ("final_logits_bias",)


def match_weights(raw: Mapping[str, Any], config, architecture: str, source: str = "checkpoint") -> dict[str, Any]:
    """Map a checkpoint's tensors onto `architecture`'s canonical names, or say exactly what is wrong.

    Handles the reference's prefix rule (a `BlenderbotModel` file loads into the LM class and back),
    drops tied copies, and lists every missing, unexpected and mis-shaped tensor by name.
    """
    arch = base_architecture(architecture)
    specs = tensor_specs(config, arch)
    wanted = {s.name: s.shape for s in specs}
    raw = dict(raw)
    # prefix rule: base-model files have no `model.` prefix
    if arch == "BlenderbotForConditionalGeneration" and "model.shared.weight" not in raw and "shared.weight" in raw:
        raw = {("model." + k if not k.startswith(("final_logits_bias", "lm_head")) else k): v for k, v in raw.items()}
    elif arch == "BlenderbotModel" and "shared.weight" not in raw and "model.shared.weight" in raw:
        raw = {k[len("model."):]: v for k, v in raw.items() if k.startswith("model.")}
    elif arch == "BlenderbotForCausalLM" and "model.decoder.embed_tokens.weight" not in raw:
        for alias in ("model.shared.weight", "shared.weight", "decoder.embed_tokens.weight"):
            if alias in raw:
                raw["model.decoder.embed_tokens.weight"] = raw.pop(alias)
                break
        # a full seq2seq file: keep the decoder and the LM head, leave the encoder behind
        raw = {("model." + k if k.startswith("decoder.") else k): v for k, v in raw.items()}
        raw = {k: v for k, v in raw.items() if not k.startswith(("model.encoder.", "encoder.", "final_logits_bias"))}
    aliases = tied_aliases(config, arch)
    for alias, canonical in aliases.items():
        if alias in raw:
            tensor = raw.pop(alias)
            if canonical not in raw:
                raw[canonical] = tensor
    for name in OPTIONAL_TENSORS:
        if name in wanted and name not in raw:
            import numpy as np

            raw[name] = np.zeros(wanted[name], dtype=np.float32)
    missing = [n for n in wanted if n not in raw]
    unexpected = sorted(n for n in raw if n not in wanted)
    misshaped = [
        f"{n}: file {tuple(int(d) for d in raw[n].shape)}, model {wanted[n]}"
        for n in wanted
        if n in raw and tuple(int(d) for d in raw[n].shape) != wanted[n]
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the {arch} described by its config:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        if misshaped:
            lines.append(f"  tensors of the wrong shape ({len(misshaped)}): " + "; ".join(misshaped))
        raise CheckpointError("\n".join(lines))
    check_weight_dtypes({n: raw[n] for n in wanted}, source)
    return {n: raw[n] for n in wanted}


# ---------------------------------------------------------------------- writing
def write_safetensors(tensors: Mapping[str, Any], folder: str, framework: str | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, metadata: dict | None = None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards with an index above `max_shard_size`.

    Tensors may be numpy arrays, torch tensors or `StoredTensor`s (loaded one at a time while writing;
    `framework` is not needed and kept for callers that pass it). Every file is written under a temporary
    name and renamed when complete; the other layout's files are removed. Returns the file names.
    """
    from .checkpoint_safetensors import write_safetensors_file
    from .fileio import atomic_path, atomic_write_text

    limit = parse_size(max_shard_size)
    metadata = {"format": "pt", **(metadata or {})}
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        names = {SAFE_WEIGHTS_NAME: shards[0]}
    else:
        names = {f"model-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, 1)}
    for fname, shard in names.items():
        with atomic_path(os.path.join(folder, fname)) as tmp:
            write_safetensors_file(tmp, shard, metadata=metadata)
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: fname for fname, shard in names.items() for k in shard}}
        atomic_write_text(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), json.dumps(index, indent=2) + "\n")
        written.append(SAFE_WEIGHTS_INDEX_NAME)
    # the other layout's files go, so the folder never holds two disagreeing checkpoints
    for name in os.listdir(folder):
        if name not in written and (name == SAFE_WEIGHTS_INDEX_NAME or name == SAFE_WEIGHTS_NAME
                                    or (_SHARD.fullmatch(name) and name.endswith(".safetensors"))):
            os.remove(os.path.join(folder, name))
    return written


def save_pretrained(folder: str, config, tensors: Mapping[str, Any], framework: str = "numpy",
                    generation_config=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    architecture: str = "BlenderbotForConditionalGeneration", weights_format: str = "safetensors",
                    ) -> None:
    """config.json (+ architectures), generation_config.json and the weights, written as one folder.

    Every backend's `save_pretrained` ends here. weights_format: "safetensors" (sharded above
    `max_shard_size`), "pt" (`pytorch_model.bin`, a pickle), "tf" (Hugging Face's `tf_model.h5`) or "flax"
    (`flax_model.msgpack`); `framework`
    names the tensors' kind ("pt" tensors are handed to the h5 and msgpack writers as numpy arrays).
    The model is written into a temporary folder beside `folder` and swapped in whole
    (`fileio.folder_transaction`): the files of the previous model, of any format, go; other files in
    the folder (a tokenizer, notes) are kept.
    """
    if weights_format not in ("safetensors", "tf", "flax", "pt"):
        raise CheckpointError(f"unknown weights format {weights_format!r}; choose safetensors, pt, tf or flax")
    arch = base_architecture(architecture)
    config = config.replace(architectures=[arch])
    if framework == "pt" and weights_format not in ("safetensors", "pt"):
        tensors = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    with folder_transaction(folder, keep_old=lambda name: not is_model_file(name)) as tmp:
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if weights_format == "safetensors":
            write_safetensors(tensors, tmp, max_shard_size=max_shard_size)
        elif weights_format == "tf":
            from .checkpoint_h5 import write_tf_h5

            write_tf_h5(tensors, os.path.join(tmp, TF_WEIGHTS_NAME), config, arch)
        elif weights_format == "pt":  # a pickle, asked for by name (safe_serialization=False in PyTorch)
            from .checkpoint_pickle import write_pickle

            write_pickle(tensors, os.path.join(tmp, PT_WEIGHTS_NAME))
        elif weights_format == "flax":
            from .checkpoint_msgpack import write_flax_msgpack

            write_flax_msgpack(tensors, os.path.join(tmp, FLAX_WEIGHTS_NAME), config, arch)
