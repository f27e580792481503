"""`pytorch_model.bin` (and its shards): PyTorch pickles, read only on explicit request.

A pickle can run arbitrary code when loaded, so nothing here reads one unless the caller passes
`allow_pickle=True` (CLI: `--allow-pickle`), and then only through `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers. This is the one place that loads pickles: Hugging Face's
`pytorch_model.bin` and the original ParlAI checkpoints (`checkpoint_parlai`) both come through
`load_pickle`. Pickle names are Hugging Face's PyTorch names (`naming.tensor_specs`): the identity map.
Writing (`write_pickle`, for `convert --to pt`) streams tensor by tensor through torch's own serialization.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._backends import require
from .checkpoint import StoredTensor, load_tensor
from .checkpoint_safetensors import dtype_name, tensor_bytes
from .errors import CheckpointError


def load_pickle(path: str, allow_pickle: bool, what: str = "a pickle file"):
    """The object in a PyTorch pickle, through torch.load(weights_only=True), memory-mapped where the file
    allows it (so tensors are read from disk when used)."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is {what}, which can run arbitrary code when loaded. blenderbot-mb loads it only when "
            "asked: convert it to safetensors once (blenderbot-mb convert MODEL_FOLDER NEW_FOLDER --allow-pickle), "
            "then use NEW_FOLDER; in Python, from_pretrained(..., allow_pickle=True) loads it as it is."
        )
    _check_magic(path)
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


def _check_magic(path: str) -> None:
    """A PyTorch checkpoint is a zip archive (torch.save since 1.6) or a pickle (the legacy format, protocol 2
    and up): anything else is refused by name, before torch.load's own errors about unsafe globals."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"{path} is empty; download or convert it again")
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return
    kind = "an HDF5 file (tf_model.h5?)" if head.startswith(b"\x89HDF") else "neither a zip archive nor a pickle"
    raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is {kind}")


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
    """`pytorch_model.bin` of {name: tensor} (numpy arrays, torch tensors or StoredTensors), one tensor at a time.

    `torch.save` under `torch.serialization.skip_data()` writes the file's layout from placeholders (one
    storage per tensor, allocated but never touched, so they take no memory) and leaves each storage's bytes
    empty; `torch.load(map_location="meta")` gives each storage's offset in the file, and every tensor is
    then loaded, written there and dropped. The model is never held whole (a plain `torch.save` needs every
    tensor in memory at once). The zip's CRC-32 fields describe the empty records: `torch.load` does not
    check them, but an unzip tool warns.
    """
    require("torch")
    import torch

    layout = {}
    for name, t in tensors.items():
        dtype = t.dtype if isinstance(t, StoredTensor) else dtype_name(t)
        layout[name] = torch.empty(tuple(int(d) for d in t.shape), dtype=_torch_dtype(name, dtype))
    with torch.serialization.skip_data():
        torch.save(layout, path)
    saved = torch.load(path, map_location="meta", weights_only=True)  # shapes and offsets, no data
    with open(path, "r+b") as f:
        for name, t in tensors.items():
            value = load_tensor(t)
            if tuple(value.shape) != tuple(saved[name].shape) or dtype_name(value) != dtype_name(saved[name]):
                raise CheckpointError(f"tensor {name} does not have the shape and dtype it was described with")
            f.seek(saved[name].untyped_storage()._checkpoint_offset)
            f.write(tensor_bytes(value))


def _torch_dtype(name: str, dtype: str):
    import torch

    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"tensor {name} has dtype {dtype}, which a PyTorch pickle cannot hold")
    return value
