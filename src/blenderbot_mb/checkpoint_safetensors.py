"""`model.safetensors` (and its shards): read with the `safetensors` library, written tensor by tensor.

Reading opens the file with `safe_open`, which checks the header against the file's size (a truncated
file is refused before anything is read), and describes every tensor from the header alone; a tensor's
bytes are read when it is loaded. Safetensors names are Hugging Face's PyTorch names
(`naming.tensor_specs`), so this format's name map is the identity in both directions.

Writing streams: the header is computed from shapes and dtypes, then each tensor is loaded, written and
dropped, so a conversion never holds the whole model (`safetensors.save_file` needs every tensor in memory
at once). The layout is the documented one: an 8-byte little-endian header length, the JSON header
(`dtype`, `shape`, `data_offsets` per tensor, `__metadata__`), then the raw little-endian bytes. Files are
read back with `safe_open` in the tests.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from .checkpoint import StoredTensor, dtype_size, load_tensor
from .errors import CheckpointError

# our framework names -> safe_open's framework
FRAMEWORKS = {"numpy": "numpy", "pt": "pt", "tf": "tf", "flax": "flax"}
# safetensors dtype codes <-> numpy-style names
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
CODES = {name: code for code, name in DTYPES.items()}


def open_safetensors(path: str, framework: str = "numpy") -> dict[str, StoredTensor]:
    """Every tensor of one file, described from its header; `load()` reads one as a `framework` tensor."""
    from safetensors import SafetensorError, safe_open

    if framework == "numpy":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
    try:
        f = safe_open(path, framework=FRAMEWORKS[framework])
        out = {}
        for key in f.keys():
            sl = f.get_slice(key)
            code = sl.get_dtype()
            out[key] = StoredTensor(tuple(int(d) for d in sl.get_shape()), DTYPES.get(code, code.lower()),
                                    _reader(f, key, path))
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file may be truncated or not a safetensors file; "
                              "download or convert it again.") from None


def _reader(f, key: str, path: str):
    def read():
        from safetensors import SafetensorError

        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {key} of {path}: {e}") from None

    return read


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a numpy array or torch tensor (any dtype, bfloat16 included)."""
    if hasattr(t, "detach"):  # torch
        import torch

        t = t.detach().cpu().contiguous().reshape(-1)
        return memoryview(t.view(torch.uint8).numpy())
    a = np.ascontiguousarray(t)
    return memoryview(a.reshape(-1).view(np.uint8))


def dtype_name(t) -> str:
    name = getattr(t.dtype, "name", None)
    return name if isinstance(name, str) else str(t.dtype).replace("torch.", "")


def write_safetensors_file(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` ({name: numpy array, torch tensor or StoredTensor}) to `path`, one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        dtype = t.dtype if isinstance(t, StoredTensor) else dtype_name(t)
        if dtype not in CODES:
            raise CheckpointError(f"tensor {name} has dtype {dtype}, which safetensors cannot hold")
        size = dtype_size(dtype)
        for d in t.shape:
            size *= int(d)
        header[name] = {"dtype": CODES[dtype], "shape": [int(d) for d in t.shape], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, t in tensors.items():
            data = tensor_bytes(load_tensor(t))
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise CheckpointError(f"tensor {name} does not have the shape and dtype its header announced")
            f.write(data)
