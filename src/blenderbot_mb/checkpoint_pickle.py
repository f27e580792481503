"""`pytorch_model.bin` (and its shards): PyTorch pickles, read only on explicit request.

A pickle can run arbitrary code when loaded, so nothing here reads one unless the caller passes
`allow_pickle=True` (CLI: `--allow-pickle`), and then only through `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers. This is the one place that loads pickles: Hugging Face's
`pytorch_model.bin` and the original ParlAI checkpoints (`checkpoint_parlai`) both come through
`load_pickle`. Pickle names are Hugging Face's PyTorch names (`naming.tensor_specs`): the identity map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._backends import require
from .checkpoint import StoredTensor, load_tensor
from .errors import CheckpointError


def load_pickle(path: str, allow_pickle: bool, what: str = "a pickle file"):
    """The object in a PyTorch pickle, through torch.load(weights_only=True), memory-mapped where the file
    allows it (so tensors are read from disk when used)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is {what}, which can run arbitrary code when loaded. blenderbot-mb loads it only when "
            "asked: pass allow_pickle=True (CLI: --allow-pickle), or convert it to safetensors once."
        )
    require("torch")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    except Exception as e:  # torch raises many types for a bad or unsafe file
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None


def stored_tensors(state: Mapping, path: str, skip: tuple[str, ...] = ()) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of a state dict; any value that is not a tensor is refused by name."""
    import torch

    out = {}
    for name, value in state.items():
        if name in skip:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = StoredTensor(tuple(int(d) for d in value.shape), str(value.dtype).replace("torch.", ""),
                                      lambda v=value: v)
    return out


def open_pickle(path: str, allow_pickle: bool) -> dict[str, StoredTensor]:
    """The tensors of one `pytorch_model.bin` (a ParlAI-style {"model": state} wrapper is unwrapped)."""
    state = load_pickle(path, allow_pickle)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return stored_tensors(state, path)


def write_pickle(tensors: Mapping[str, Any], path: str) -> None:
    """torch.save of {name: tensor} (numpy arrays, torch tensors or StoredTensors)."""
    require("torch")
    import numpy as np
    import torch

    state = {}
    for name, t in tensors.items():
        value = load_tensor(t)
        state[name] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    torch.save(state, path)
