"""LoRA adapters, framework-free: which layers, file names and layout, merging.

A LoRA layer adds `scaling * B @ A` to a frozen Linear weight W [out, in]: A is [rank, in], B is [out, rank]
(PyTorch layout, B starts at zero), scaling = alpha / rank. Targets are the attention projections
(q/k/v/out_proj of every self- and cross-attention), optionally the FFN (fc1, fc2).

Files, as the `peft` library writes them for a sequence-to-sequence model, so `peft.PeftModel.from_pretrained`
loads them into transformers' BlenderbotForConditionalGeneration and ours load peft's:
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and
`adapter_config.json` (peft_type LORA, task_type SEQ_2_SEQ_LM, r, lora_alpha, target_modules, ...).

    >>> merged = merge(base_weights, read_adapters("out/"))        # numpy, canonical names
    >>> merge_folder("facebook/blenderbot-400M-distill", "out/", "merged/")
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib

import numpy as np

from .errors import CheckpointError
from .fileio import atomic_write_text, holds_files

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FFN_TARGETS = ("fc1", "fc2")
PREFIX = "base_model.model."
_KEY = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight")


def target_names(ffn: bool = False) -> tuple[str, ...]:
    return ATTENTION_TARGETS + (FFN_TARGETS if ffn else ())


def target_modules(config, targets=ATTENTION_TARGETS, architecture: str = "BlenderbotForConditionalGeneration"):
    """Module paths (HF names without `.weight`) of the Linear layers that get adapters."""
    from .naming import LINEAR, tensor_specs

    return [s.name[: -len(".weight")] for s in tensor_specs(config, architecture)
            if s.kind == LINEAR and s.name.split(".")[-2] in targets]


def initial_a(module: str, fan_in: int, rank: int, seed: int = 0) -> np.ndarray:
    """A new adapter's A [rank, in], float32: uniform in +-1/sqrt(in) (PyTorch Linear's default, as peft's), drawn
    from a stream named by the seed and the module, so that every backend starts a run from the same adapters
    (B starts at zero)."""
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)


def adapter_keys(module: str) -> tuple[str, str]:
    """File names of the A and B matrices of one module."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(rank: int, alpha: float, targets, base_model: str | None = None, dropout: float = 0.0) -> dict:
    return {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "base_model_name_or_path": base_model, "inference_mode": True}


def save_adapters(folder: str, tensors: dict, rank: int, alpha: float, targets,
                  base_model: str | None = None, dropout: float = 0.0) -> None:
    """adapter_model.safetensors (numpy or framework tensors keyed by `adapter_keys`) and adapter_config.json,
    each atomically."""
    from .checkpoint_safetensors import write_safetensors_file
    from .fileio import atomic_path

    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, ADAPTER_WEIGHTS_NAME)) as tmp:
        write_safetensors_file(tmp, dict(tensors), metadata={"format": "pt"})
    config = adapter_config(rank, alpha, targets, base_model, dropout)
    atomic_write_text(os.path.join(folder, ADAPTER_CONFIG_NAME), json.dumps(config, indent=2) + "\n")


def read_adapters(folder: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """({module: (A, B)} as float32 numpy, adapter config)."""
    from .checkpoint_safetensors import open_safetensors

    paths = [os.path.join(folder, n) for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder} holds no LoRA adapters ({os.path.basename(path)} is missing)")
    with open(paths[0], encoding="utf-8") as f:
        config = json.load(f)
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for key, stored in open_safetensors(paths[1]).items():
        value = stored.load()
        m = _KEY.fullmatch(key)
        if not m:
            raise CheckpointError(f"{paths[1]}: unexpected tensor {key} (expected {PREFIX}<module>.lora_A/B.weight)")
        pieces.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, dtype=np.float32)
    incomplete = sorted(m for m, p in pieces.items() if set(p) != {"A", "B"})
    if incomplete:
        raise CheckpointError(f"{paths[1]}: modules without both lora_A and lora_B: {', '.join(incomplete)}")
    return {m: (p["A"], p["B"]) for m, p in pieces.items()}, config


def merge(weights: dict[str, np.ndarray], adapters: dict, scaling: float) -> dict[str, np.ndarray]:
    """W + scaling * B @ A for every adapted module (canonical names, PyTorch layout)."""
    out = dict(weights)
    for module, (a, b) in adapters.items():
        name = f"{module}.weight"
        if name not in out:
            raise CheckpointError(f"the adapters adapt {module}, which the base model does not have")
        w = out[name]
        if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1] or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{module}: adapter shapes A {a.shape}, B {b.shape} do not fit weight {w.shape}")
        out[name] = (w.astype(np.float32) + scaling * (b @ a)).astype(w.dtype)
    return out


def merge_folder(base: str | None, adapters_folder: str, out: str) -> str:
    """Merge the adapters of `adapters_folder` into `base` (default: the adapters' base model); write an HF
    model folder to `out` (weights, config, generation settings, tokenizer)."""
    from .checkpoint import read_weights, save_pretrained
    from .config import BlenderbotConfig
    from .generation_config import GenerationConfig
    from .hub import resolve_folder

    if os.path.isdir(out) and holds_files(out):
        raise CheckpointError(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    adapters, config = read_adapters(adapters_folder)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapters_folder}/{ADAPTER_CONFIG_NAME} names no base model; pass the base")
    folder = resolve_folder(base)
    model_config = BlenderbotConfig.from_pretrained(folder)
    arch = "BlenderbotForConditionalGeneration"
    merged = merge(read_weights(folder, model_config, arch), adapters, config["lora_alpha"] / config["r"])
    save_pretrained(out, model_config, merged, generation_config=GenerationConfig.from_pretrained(folder, model_config))
    for source in (adapters_folder, folder):  # the tokenizer: trained beside the adapters, else the base's
        if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            from .tokenizer import BlenderbotTokenizer

            BlenderbotTokenizer.from_pretrained(source).save_pretrained(out)
            break
    return out
