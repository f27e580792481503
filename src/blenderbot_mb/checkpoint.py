"""Checkpoint files in Hugging Face layout: reading, checking against the config, and writing.

The default format is safetensors (`model.safetensors`, or shards plus `model.safetensors.index.json`
above `max_shard_size`). Hugging Face's `tf_model.h5` and `flax_model.msgpack` are read through
`checkpoint_h5` and `checkpoint_msgpack`; `pytorch_model.bin` (a pickle) only with an explicit
`allow_pickle=True`, and then through `torch.load(weights_only=True)`.

Tensors here are opaque objects with a `.shape`: the backends pass their framework name and get
their own tensors back, so bf16 files load without a detour through numpy. Names and shapes are
checked against `naming.tensor_specs`; every missing, unexpected or mis-shaped tensor is listed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError, ConfigError
from .fileio import atomic_path, atomic_write_text, checked_file, folder_transaction
from .naming import base_architecture, tensor_specs, tied_aliases
from .validation import check_weight_dtypes

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
TF_WEIGHTS_NAME = "tf_model.h5"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, FLAX_WEIGHTS_NAME, TF_WEIGHTS_NAME, PT_WEIGHTS_NAME,
                PT_WEIGHTS_INDEX_NAME)
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def is_model_file(name: str) -> bool:
    """Whether a file name is part of a saved model (config, weights of any format, shards): the files a
    save replaces, so no file of another format survives beside the new ones."""
    return name in CONFIG_FILES or name in WEIGHT_FILES or _SHARD.fullmatch(name) is not None

# our framework names -> safetensors' module and safe_open framework
_SAFETENSORS = {"numpy": ("numpy", "numpy"), "pt": ("torch", "pt"), "tf": ("tensorflow", "tf"), "flax": ("flax", "flax")}


# ---------------------------------------------------------------------- sizes
def parse_size(size: int | str) -> int:
    """'5GB' -> bytes (decimal units as the reference: 1GB = 10**9; 'GiB' = 2**30)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _nbytes(t) -> int:
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
def find_weights_file(folder: str) -> str:
    """The weight file a folder holds, by the reference's order of preference."""
    for name in WEIGHT_FILES:
        if os.path.lexists(os.path.join(folder, name)):
            return checked_file(folder, name, "weights file")
    raise CheckpointError(
        f"no weights in {folder}: expected one of {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{FLAX_WEIGHTS_NAME}, {TF_WEIGHTS_NAME}, {PT_WEIGHTS_NAME}"
    )


def read_safetensors(path: str, framework: str = "numpy") -> dict[str, Any]:
    """All tensors of one safetensors file, as `framework` tensors. Truncated files raise CheckpointError."""
    from safetensors import SafetensorError, safe_open

    _, fw = _SAFETENSORS[framework]
    try:
        out = {}
        with safe_open(path, framework=fw) as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}. The file may be truncated or not a safetensors file; "
            "download or convert it again."
        ) from None


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


def read_sharded_safetensors(index_path: str, framework: str = "numpy", folder: str | None = None) -> dict[str, Any]:
    weight_map, shards = read_index(index_path, folder or os.path.dirname(index_path))
    tensors: dict[str, Any] = {}
    for shard_path in shards:
        tensors.update(read_safetensors(shard_path, framework))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"shards of {index_path} lack tensors the index lists: {', '.join(missing)}")
    return tensors


def read_pickle(path: str, allow_pickle: bool, folder: str | None = None) -> dict[str, Any]:
    """A PyTorch pickle checkpoint, only on explicit request, and only its tensors (weights_only)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle file, which can run arbitrary code when loaded. blenderbot-mb loads it only "
            "when asked: pass allow_pickle=True (CLI: --allow-pickle), or convert it to safetensors once."
        )
    from ._backends import require

    require("torch")
    import torch

    paths = [path]
    if path.endswith(".index.json"):
        paths = read_index(path, folder or os.path.dirname(path))[1]
    out = {}
    for p in paths:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise CheckpointError(f"cannot read {p} with torch.load(weights_only=True): {e}") from None
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]  # a ParlAI-style wrapper
        out.update(state)
    return out


def read_weights(folder: str, config, architecture: str, framework: str = "numpy",
                 allow_pickle: bool = False) -> dict[str, Any]:
    """Read the folder's weights and return them checked, in canonical names (see `match_weights`)."""
    path = find_weights_file(folder)  # resolved: a hub snapshot's file is a blob with another name
    name = next(n for n in WEIGHT_FILES if os.path.lexists(os.path.join(folder, n)))
    if name == SAFE_WEIGHTS_NAME:
        raw = read_safetensors(path, framework)
    elif name == SAFE_WEIGHTS_INDEX_NAME:
        raw = read_sharded_safetensors(path, framework, folder=folder)
    elif name == TF_WEIGHTS_NAME:
        from .checkpoint_h5 import read_tf_h5

        raw = read_tf_h5(path, config)
    elif name == FLAX_WEIGHTS_NAME:
        from .checkpoint_msgpack import read_flax_msgpack

        raw = read_flax_msgpack(path, config)
    else:
        raw = read_pickle(path, allow_pickle, folder=folder)
    weights = match_weights(raw, config, architecture, source=path)
    import numpy as np

    if framework == "pt":  # h5 and msgpack files arrive as numpy arrays
        import torch

        weights = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                   for k, v in weights.items()}
    elif framework == "numpy":  # pickles arrive as torch tensors (bf16 widened: numpy has none)
        weights = {k: v.detach().cpu().float().numpy() if hasattr(v, "detach") else v for k, v in weights.items()}
    return weights


# transformers' from_pretrained options this package does not offer, with what to do instead
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
    "from_pt": "every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are",
    "from_tf": "every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are",
    "from_flax": "every backend reads model.safetensors, tf_model.h5 and flax_model.msgpack as they are",
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
    from .config import BlenderbotConfig
    from .generation_config import GenerationConfig
    from .hub import pop_hub_kwargs, resolve_folder

    hub_kwargs = pop_hub_kwargs(kwargs)
    config_overrides, generation_overrides = split_pretrained_kwargs(kwargs)
    folder = resolve_folder(name_or_path, allow_pickle=allow_pickle, **hub_kwargs)
    config = config if config is not None else BlenderbotConfig.from_pretrained(folder)
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
def write_safetensors(tensors: Mapping[str, Any], folder: str, framework: str = "numpy",
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, metadata: dict | None = None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards with an index above `max_shard_size`.

    Every file is written under a temporary name and renamed when complete. Returns the file names.
    """
    import importlib

    module, _ = _SAFETENSORS[framework]
    save_file = importlib.import_module(f"safetensors.{module}").save_file
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
    # remove stale files of the other layout, so the folder never holds two disagreeing checkpoints
    stale = [SAFE_WEIGHTS_INDEX_NAME] if len(shards) == 1 else [SAFE_WEIGHTS_NAME]
    if len(shards) == 1:
        with atomic_path(os.path.join(folder, SAFE_WEIGHTS_NAME)) as tmp:
            save_file(dict(shards[0]), tmp, metadata=metadata)
        written = [SAFE_WEIGHTS_NAME]
    else:
        written, weight_map = [], {}
        total = sum(_nbytes(t) for t in tensors.values())
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(os.path.join(folder, fname)) as tmp:
                save_file(dict(shard), tmp, metadata=metadata)
            written.append(fname)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), json.dumps(index, indent=2) + "\n")
        written.append(SAFE_WEIGHTS_INDEX_NAME)
    for name in stale:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)
    return written


def save_pretrained(folder: str, config, tensors: Mapping[str, Any], framework: str = "numpy",
                    generation_config=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    architecture: str = "BlenderbotForConditionalGeneration", weights_format: str = "safetensors",
                    ) -> None:
    """config.json (+ architectures), generation_config.json and the weights, written as one folder.

    Every backend's `save_pretrained` ends here. weights_format: "safetensors" (sharded above
    `max_shard_size`), "tf" (Hugging Face's `tf_model.h5`) or "flax" (`flax_model.msgpack`); the last two
    take numpy tensors. The model is written into a temporary folder beside `folder` and swapped in whole
    (`fileio.folder_transaction`): the files of the previous model, of any format, go; other files in the
    folder (a tokenizer, notes) are kept.
    """
    if weights_format not in ("safetensors", "tf", "flax"):
        raise CheckpointError(f"unknown weights format {weights_format!r}; choose safetensors, tf or flax")
    arch = base_architecture(architecture)
    config = config.replace(architectures=[arch])
    with folder_transaction(folder, keep_old=lambda name: not is_model_file(name)) as tmp:
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if weights_format == "safetensors":
            write_safetensors(tensors, tmp, framework=framework, max_shard_size=max_shard_size)
        elif weights_format == "tf":
            from .checkpoint_h5 import write_tf_h5

            write_tf_h5(tensors, os.path.join(tmp, TF_WEIGHTS_NAME), config, arch)
        elif weights_format == "flax":
            from .checkpoint_msgpack import write_flax_msgpack

            write_flax_msgpack(tensors, os.path.join(tmp, FLAX_WEIGHTS_NAME), config, arch)
