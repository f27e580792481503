"""Converting checkpoints between formats: HF safetensors, `pytorch_model.bin`, `tf_model.h5`,
`flax_model.msgpack`, and the original ParlAI `*.pt` pickles.

Every reader gives {Hugging Face PyTorch name: numpy array in PyTorch layout}, checked against the
config by `checkpoint.match_weights`; every writer takes that dict. So a conversion is one read and
one write, and no framework is needed except where a format is a framework's own: pickles need
torch (`torch.load(weights_only=True)`), msgpack needs `flax.serialization`, h5 needs `h5py`.

    >>> from blenderbot_mb.convert import convert_checkpoint
    >>> convert_checkpoint("path/to/hf-folder", "path/to/out", to="flax")        # doctest: +SKIP
    >>> convert_checkpoint("blender.pt", "out", allow_pickle=True)              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    FLAX_WEIGHTS_NAME,
    PT_WEIGHTS_INDEX_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TF_WEIGHTS_NAME,
    match_weights,
    read_weights,
    write_safetensors,
)
from .config import CONFIG_NAME, BlenderbotConfig
from .errors import CheckpointError, ConfigError, InputError
from .fileio import atomic_path, copy_confined, folder_transaction
from .generation_config import GENERATION_CONFIG_NAME, GenerationConfig
from .naming import base_architecture, parlai_to_hf_name

FORMATS = {"safetensors": SAFE_WEIGHTS_NAME, "pt": PT_WEIGHTS_NAME, "tf": TF_WEIGHTS_NAME, "flax": FLAX_WEIGHTS_NAME}
HF_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME,
                   TF_WEIGHTS_NAME, FLAX_WEIGHTS_NAME)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
DEFAULT_ARCHITECTURE = "BlenderbotForConditionalGeneration"


# ---------------------------------------------------------------------- the one entry point
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str = "safetensors",
                       allow_pickle: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       from_parlai: bool | None = None, tokenizer: str | os.PathLike | None = None,
                       force: bool = False) -> str:
    """Convert the checkpoint at `src` (a model folder, a hub id or a ParlAI `*.pt` file) into folder `dst`.

    to: "safetensors" (sharded above `max_shard_size`), "pt" (`pytorch_model.bin`), "tf" (`tf_model.h5`)
        or "flax" (`flax_model.msgpack`).
    allow_pickle: pickles (`pytorch_model.bin`, ParlAI files) are read only when this is True.
    from_parlai: read `src` as a ParlAI original; None guesses (a file that is not an HF weight file).
    tokenizer: a folder to copy tokenizer files from (default: the source folder, if it has them).
    force: replace an existing non-empty `dst` (without it, such a folder is refused).

    dst receives config.json, generation_config.json (when there are settings to keep), the weights,
    and the tokenizer files, all written into a temporary folder beside `dst` and swapped in whole when
    complete (`fileio.folder_transaction`): a failed or killed conversion leaves `dst` as it was. Returns dst.
    """
    if to not in FORMATS:
        raise InputError(f"unknown target format {to!r}; choose one of: {', '.join(FORMATS)}")
    src, dst = os.fspath(src), os.fspath(dst)
    check_destination(dst, force)
    if from_parlai is None:
        from_parlai = os.path.isfile(src) and os.path.basename(src) not in HF_WEIGHT_FILES \
            and not src.endswith(".safetensors")
    if from_parlai:
        config, generation, tensors = read_parlai_checkpoint(src, allow_pickle=allow_pickle)
        arch = DEFAULT_ARCHITECTURE
        source_folder = os.path.dirname(os.path.abspath(src))
    else:
        source_folder, config, arch = read_folder_config(src, allow_pickle)
        tensors = read_numpy_weights(source_folder, config, arch, allow_pickle)
        generation = None
        if os.path.isfile(os.path.join(source_folder, GENERATION_CONFIG_NAME)):
            generation = GenerationConfig.from_pretrained(source_folder, config)
    with folder_transaction(dst, refuse_non_empty=not force) as tmp:
        write_folder(tmp, config, tensors, to=to, architecture=arch, generation_config=generation,
                     max_shard_size=max_shard_size)
        copy_tokenizer_files(os.fspath(tokenizer) if tokenizer is not None else source_folder, tmp)
    return dst


def check_destination(dst: str, force: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless `force` (checked again under the
    folder's lock when writing)."""
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst} is a file, not a folder; pass a folder to write the model into")
    if not force and os.path.isdir(dst) and os.listdir(dst):
        raise CheckpointError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")


# ---------------------------------------------------------------------- Hugging Face folders
def read_folder_config(src: str, allow_pickle: bool = False) -> tuple[str, BlenderbotConfig, str]:
    """(folder, config, architecture) of a model folder, a weight file inside one, or a hub id."""
    from .hub import resolve_folder

    if os.path.isfile(src) and (os.path.basename(src) in HF_WEIGHT_FILES or src.endswith(".safetensors")):
        src = os.path.dirname(os.path.abspath(src))
    folder = resolve_folder(src, allow_pickle=allow_pickle)
    config = BlenderbotConfig.from_json_file(os.path.join(folder, CONFIG_NAME))
    archs = config.extra.get("architectures") or [DEFAULT_ARCHITECTURE]
    try:
        arch = base_architecture(archs[0])
    except ValueError as e:
        raise ConfigError(f"{os.path.join(folder, CONFIG_NAME)}: {e}") from None
    return folder, config, arch


def read_numpy_weights(folder: str, config, architecture: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The folder's weights as numpy arrays (PyTorch names and layout), checked against the config."""
    tensors = read_weights(folder, config, architecture, framework="numpy", allow_pickle=allow_pickle)
    return {name: to_numpy(t) for name, t in tensors.items()}


def to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # a torch tensor from a pickle; numpy has no bfloat16, so widen it
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


# ---------------------------------------------------------------------- writing
def write_weights(tensors: Mapping[str, np.ndarray], folder: str, to: str, config,
                  architecture: str = DEFAULT_ARCHITECTURE, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write `tensors` (PyTorch names and layout) as format `to` into `folder`. Returns the file's name."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if to == "safetensors":
        write_safetensors(tensors, folder, framework="numpy", max_shard_size=max_shard_size)
    elif to == "pt":
        from ._backends import require

        require("torch")
        import torch

        with atomic_path(os.path.join(folder, PT_WEIGHTS_NAME)) as tmp:
            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp)
    elif to == "tf":
        from .checkpoint_h5 import write_tf_h5

        with atomic_path(os.path.join(folder, TF_WEIGHTS_NAME)) as tmp:
            write_tf_h5(tensors, tmp, config, architecture)
    elif to == "flax":
        from .checkpoint_msgpack import write_flax_msgpack

        with atomic_path(os.path.join(folder, FLAX_WEIGHTS_NAME)) as tmp:
            write_flax_msgpack(tensors, tmp, config, architecture)
    else:
        raise InputError(f"unknown target format {to!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[to]


def write_folder(folder: str, config, tensors, to: str = "safetensors", architecture: str = DEFAULT_ARCHITECTURE,
                 generation_config: GenerationConfig | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Weights first, then config.json and generation_config.json (so a folder with a config is complete)."""
    write_weights(tensors, folder, to, config, architecture, max_shard_size)
    config.replace(architectures=[base_architecture(architecture)]).save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def copy_tokenizer_files(src_folder: str, dst_folder: str) -> list[str]:
    """Copy the tokenizer files `src_folder` holds; none may be a symlink out of it (`fileio.copy_confined`)."""
    if not os.path.isdir(src_folder) or os.path.abspath(src_folder) == os.path.abspath(dst_folder):
        return []
    return [name for name in TOKENIZER_FILES if copy_confined(src_folder, name, dst_folder)]


# ---------------------------------------------------------------------- ParlAI originals
def load_parlai_pickle(path: str, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, opt) of a ParlAI checkpoint: a pickle with the weights under "model" and the options
    under "opt" (or in a `<path>.opt` JSON file beside it, as ParlAI also writes)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no ParlAI checkpoint file at {path}")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle file (a ParlAI checkpoint), which can run arbitrary code when loaded. "
            "blenderbot-mb loads it only when asked: pass allow_pickle=True (CLI: --allow-pickle)."
        )
    from ._backends import require

    require("torch")
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe file
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise CheckpointError(f"{path} is not a ParlAI checkpoint: expected a dict with the weights under 'model'")
    opt = data.get("opt")
    if opt is None and os.path.isfile(path + ".opt"):
        try:
            with open(path + ".opt", encoding="utf-8") as f:
                opt = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}.opt is not valid JSON: {e}") from None
    if not isinstance(opt, Mapping):
        raise ConfigError(f"{path} has no ParlAI options: expected an 'opt' dict in it or a {path}.opt file")
    return dict(data["model"]), dict(opt)


def _opt_int(opt: Mapping, key: str, default: int | None = None) -> int | None:
    value = opt.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ParlAI option {key!r} must be an integer, got {value!r}")
    return value


def parlai_config(opt: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[BlenderbotConfig, GenerationConfig]:
    """The BlenderbotConfig and generation settings a ParlAI `opt` describes.

    Sizes come from the options and are checked against the tensors (vocabulary size and position count
    are read off the embeddings). Only the pre-LayerNorm `variant` is Blenderbot; ParlAI's special tokens
    `__null__`, `__start__`, `__end__`, `__unk__` are ids 0-3, i.e. pad, bos/decoder start, eos, unk.
    """
    variant = opt.get("variant", "aiayn")
    if variant != "prelayernorm":
        raise ConfigError(
            f"ParlAI option 'variant' is {variant!r}; Blenderbot (this architecture) is the 'prelayernorm' variant "
            "('xlm' is BlenderbotSmall, 'aiayn' the post-LayerNorm Transformer)"
        )
    if "embeddings.weight" not in state or "encoder.position_embeddings.weight" not in state:
        raise CheckpointError("ParlAI state dict lacks 'embeddings.weight' or 'encoder.position_embeddings.weight'")
    vocab, width = (int(d) for d in state["embeddings.weight"].shape)
    positions = int(state["encoder.position_embeddings.weight"].shape[0])
    d_model = _opt_int(opt, "embedding_size", width)
    if d_model != width:
        raise ConfigError(f"ParlAI option 'embedding_size' is {d_model}, but the embeddings are {width} wide")
    n_positions = _opt_int(opt, "n_positions", positions)
    if n_positions != positions:
        raise ConfigError(f"ParlAI option 'n_positions' is {n_positions}, but the position table has {positions} rows")
    n_layers = _opt_int(opt, "n_layers", 2)
    enc = _opt_int(opt, "n_encoder_layers", -1)
    dec = _opt_int(opt, "n_decoder_layers", -1)
    heads = _opt_int(opt, "n_heads", 2)
    ffn = _opt_int(opt, "ffn_size", None)
    if ffn is None:
        raise ConfigError("ParlAI options lack 'ffn_size'")
    tokens = [opt.get(k) for k in ("dict_nulltoken", "dict_starttoken", "dict_endtoken", "dict_unktoken")]
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
               "forced_eos_token_id": 2}
    context_block = max(0, _opt_int(opt, "beam_context_block_ngram", 0))
    config = BlenderbotConfig.from_dict(dict(
        vocab_size=vocab, max_position_embeddings=positions, d_model=d_model,
        encoder_layers=n_layers if enc in (None, -1) else enc, decoder_layers=n_layers if dec in (None, -1) else dec,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        activation_function=opt.get("activation", "relu"), scale_embedding=bool(opt.get("embeddings_scale", True)),
        dropout=float(opt.get("dropout", 0.0)), attention_dropout=float(opt.get("attention_dropout", 0.0)),
        activation_dropout=float(opt.get("relu_dropout", 0.0)), encoder_no_repeat_ngram_size=context_block,
        architectures=[DEFAULT_ARCHITECTURE], **special,
    ))
    if any(t is not None for t in tokens):
        config = config.replace(parlai_special_tokens=tokens)
    max_length = min(positions, _opt_int(opt, "label_truncate", 60) or 60)
    generation = GenerationConfig.from_dict(dict(
        num_beams=max(1, _opt_int(opt, "beam_size", 1)),
        min_length=min(max(0, _opt_int(opt, "beam_min_length", 0)), max_length),
        max_length=max_length,
        length_penalty=float(opt.get("beam_length_penalty", 1.0)),
        no_repeat_ngram_size=max(0, _opt_int(opt, "beam_block_ngram", 0)),
        encoder_no_repeat_ngram_size=context_block,
        **special,
    ))
    return config, generation


def parlai_to_hf_weights(state: Mapping[str, Any], config) -> dict[str, np.ndarray]:
    """Rename a ParlAI state dict to Hugging Face names, add the zero `final_logits_bias` ParlAI lacks,
    and check the result against the config (unknown ParlAI names are listed as unexpected)."""
    renamed: dict[str, Any] = {}
    for name, t in state.items():
        hf = parlai_to_hf_name(name)
        if hf is not None:
            renamed[hf] = to_numpy(t)
    dtype = renamed["model.shared.weight"].dtype
    renamed.setdefault("final_logits_bias", np.zeros((1, config.vocab_size), dtype=dtype))
    return match_weights(renamed, config, DEFAULT_ARCHITECTURE, source="ParlAI checkpoint")


def read_parlai_checkpoint(path: str, allow_pickle: bool = False):
    """(config, generation settings, {HF name: numpy array}) of a ParlAI original checkpoint."""
    state, opt = load_parlai_pickle(path, allow_pickle)
    config, generation = parlai_config(opt, state)
    return config, generation, parlai_to_hf_weights(state, config)
