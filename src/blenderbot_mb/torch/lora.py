"""LoRA for the PyTorch backend: frozen Linear layers plus trainable low-rank adapters (rules and files in
`blenderbot_mb.lora`; the attribute names `base_layer`, `lora_A`, `lora_B` are peft's).

    >>> modules = add_lora(model, rank=8, alpha=16)          # attention projections; base frozen
    >>> save_adapters(model, "out/", rank=8, alpha=16)        # adapter_model.safetensors + adapter_config.json
    >>> merged = merged_state_dict(model)                     # canonical names, adapters folded in
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import lora


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))); A [rank, in] Kaiming-uniform (or `initial_a`), B [out, rank]
    zeros."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, initial_a=None):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        if initial_a is None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                self.lora_A.weight.copy_(torch.as_tensor(initial_a))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (self.base_layer.weight.float() + self.scaling * (b @ a)).to(self.base_layer.weight.dtype)


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model, rank: int, alpha: float | None = None, ffn: bool = False, dropout: float = 0.0,
             seed: int | None = 0) -> list[str]:
    """Wrap the target Linear layers (lora.target_modules) and freeze everything but the adapters. A starts as
    `lora.initial_a(module, in, rank, seed)` (the same in every backend); seed=None draws it from torch's RNG."""
    alpha = alpha or rank
    for p in model.parameters():
        p.requires_grad_(False)
    names = lora.target_modules(model.config, lora.target_names(ffn), model.architecture)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        initial = None if seed is None else lora.initial_a(name, base.in_features, rank, seed)
        setattr(parent, attr, LoRALinear(base, rank, alpha, dropout, initial))
    return names


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters under their file names (`lora.adapter_keys`)."""
    out = {}
    for name, m in lora_modules(model).items():
        key_a, key_b = lora.adapter_keys(name)
        out[key_a], out[key_b] = m.lora_A.weight.detach(), m.lora_B.weight.detach()
    return out


def load_adapters(model, adapters: dict) -> None:
    """Copy {module: (A, B)} (numpy or tensors, as `lora.read_adapters` returns) into the adapters."""
    modules = lora_modules(model)
    missing = sorted(set(modules) ^ set(adapters))
    if missing:
        from ..errors import CheckpointError

        raise CheckpointError(f"adapters and model disagree on the adapted modules: {', '.join(missing)}")
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            modules[name].lora_A.weight.copy_(torch.as_tensor(a))
            modules[name].lora_B.weight.copy_(torch.as_tensor(b))


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The canonical tensors of the model with every adapter folded into its base weight."""
    from ..naming import tensor_names

    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in lora_modules(model).items():
        state[f"{name}.weight"] = m.merged_weight()
    return {n: state[n].detach().contiguous() for n in tensor_names(model.config, model.architecture)}


def save_adapters(model, folder: str, rank: int, alpha: float | None = None, ffn: bool = False,
                  base_model: str | None = None) -> None:
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    lora.save_adapters(folder, tensors, rank=rank, alpha=alpha or rank,
                       targets=lora.target_names(ffn), base_model=base_model)
