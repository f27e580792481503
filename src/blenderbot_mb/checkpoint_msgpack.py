"""Hugging Face's `flax_model.msgpack`: the Flax params tree, written with `flax.serialization`.

The tree is nested dicts in Flax names (`model/encoder/layers/0/self_attn/k_proj/kernel`), Linear
kernels [in, out], LayerNorm `scale`/`bias`, embeddings `embedding`, `final_logits_bias` at the top;
a `BlenderbotModel` file has no `model` level. An untied LM head is a Dense `lm_head/kernel` of shape
[d_model, vocab] (HF's FlaxBlenderbot has no `lm_head` entry when the head is tied).

This module is part of the framework-free core: reading needs `msgpack` alone (flax's array encoding is
decoded here, with its sizes checked); writing uses `flax.serialization`, imported inside the functions.
`params_from_tensors` / `tensors_from_params` are also what the Flax backend uses to build its
params from checkpoint tensors and back, so every layout goes through `naming.tensor_specs`.
"""

from __future__ import annotations

from math import prod
from typing import Any

import msgpack
import numpy as np

from .checkpoint import StoredTensor, load_tensor
from .errors import CheckpointError, MissingBackendError
from .fileio import atomic_path
from .naming import ARCHITECTURES, flax_path, flax_transposed, tensor_specs

MAX_CHUNK_SIZE = 2**30  # flax.serialization writes larger leaves in chunks of at most this many bytes


def _serialization():
    try:
        from flax import serialization
    except ImportError:
        raise MissingBackendError(
            "reading or writing flax_model.msgpack needs 'flax'. Install it with: pip install 'blenderbot-mb[flax]'"
        ) from None
    return serialization


def params_from_tensors(tensors: dict[str, Any], config, architecture: str) -> dict:
    """{canonical PyTorch name: tensor} -> nested Flax params dict (kernels transposed)."""
    params: dict = {}
    for spec in tensor_specs(config, architecture):
        t = tensors[spec.name]
        node = params
        *parents, leaf = flax_path(spec)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = t.T if flax_transposed(spec) else t
    return params


def tensors_from_params(params, config, architecture: str) -> dict[str, Any]:
    """Nested Flax params -> {canonical PyTorch name: tensor in PyTorch layout}, checked against the config."""
    out = {}
    missing = []
    for spec in tensor_specs(config, architecture):
        node = params
        try:
            for p in flax_path(spec):
                node = node[p]
        except (KeyError, TypeError):
            missing.append("/".join(flax_path(spec)))
            continue
        out[spec.name] = node.T if flax_transposed(spec) else node
    if missing:
        raise CheckpointError(f"Flax params lack {len(missing)} entries: " + ", ".join(missing))
    return out


def name_map(config) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{Flax params path: (Hugging Face name, stored transposed)} for every architecture's tensors, derived from
    `naming.tensor_specs` through `naming.flax_path` (the paths `params_from_tensors` builds)."""
    return {flax_path(spec): (spec.name, flax_transposed(spec))
            for arch in ARCHITECTURES for spec in tensor_specs(config, arch)}


def _max_leaf_bytes(config) -> int:
    """The largest leaf a file for `config` may hold (float64 at most); larger ones are refused unread."""
    largest = max(prod(spec.shape) for arch in ARCHITECTURES for spec in tensor_specs(config, arch))
    return min(largest * 8, MAX_CHUNK_SIZE) + 4096


def _ndarray(data: bytes, path: str):
    """Flax's ndarray encoding: msgpack of (shape, dtype name, raw bytes)."""
    try:
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        dtype = np.dtype(_dtype(dtype.decode("ascii")))
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape) or prod(shape) * dtype.itemsize != len(buffer):
            raise ValueError(f"{len(buffer)} bytes cannot hold shape {shape} of {dtype.name}")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, msgpack.UnpackException) as e:
        raise CheckpointError(f"{path}: malformed array leaf ({type(e).__name__}: {e})") from None


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


def _unchunk(node: dict, path: str, keys: tuple[str, ...]):
    """Flax writes leaves above 1 GiB as {"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}."""
    try:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks) or \
                sum(c.size for c in chunks) != prod(shape):
            raise ValueError("chunks do not add up to the shape")
        return np.concatenate(chunks).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed chunked array at {'/'.join(keys)} ({e})") from None


def _leaves(tree, path: str, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        keys = (*prefix, str(key))
        if isinstance(value, dict) and "__msgpack_chunked_array__" in value:
            yield keys, _unchunk(value, path, keys)
        elif isinstance(value, dict):
            yield from _leaves(value, path, keys)
        elif isinstance(value, np.ndarray):
            yield keys, value
        else:
            raise CheckpointError(f"{path}: {'/'.join(keys)} is a {type(value).__name__}, not an array")


def open_flax_msgpack(path: str, config) -> dict[str, StoredTensor]:
    """All tensors of a `flax_model.msgpack` as {Hugging Face name: StoredTensor in PyTorch layout}.

    The file is read as a stream with msgpack's own size limits set from the config (no leaf larger than
    the model's largest tensor is buffered). Names come from `name_map`; unknown paths are kept as
    "a/b/c" so `checkpoint.match_weights` lists them as unexpected.
    """
    names = name_map(config)
    limit = _max_leaf_bytes(config)
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=limit,
                                        ext_hook=lambda code, data: _ext(code, data, path))
            tree = unpacker.unpack()
            extra = next(iter(unpacker), None) is not None
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises many types for a damaged file
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e}. The file may be truncated or not a Flax msgpack file."
        ) from None
    if extra:
        raise CheckpointError(f"{path} holds data after the params tree: not a Flax msgpack file")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} does not hold a Flax params tree (got {type(tree).__name__})")
    if set(tree) == {"params"} and isinstance(tree["params"], dict):  # a variables dict rather than bare params
        tree = tree["params"]
    out = {}
    for keys, value in _leaves(tree, path):
        name, transposed = names.get(keys, ("/".join(keys), False))
        value = value.T if transposed else value
        out[name] = StoredTensor(tuple(int(d) for d in value.shape), value.dtype.name, lambda v=value: v)
    return out


def _ext(code: int, data: bytes, path: str):
    if code != 1:  # flax's ndarray code; scalars and complex numbers have no place in a params tree
        raise CheckpointError(f"{path}: unexpected msgpack extension type {code}")
    return _ndarray(data, path)


def read_flax_msgpack(path: str, config) -> dict[str, Any]:
    """{Hugging Face name: numpy array in PyTorch layout} of a `flax_model.msgpack` (names checked by the caller)."""
    return {name: t.load() for name, t in open_flax_msgpack(path, config).items()}


def write_flax_msgpack(tensors: dict[str, Any], path: str, config, architecture: str) -> None:
    """Write canonical tensors as HF's FlaxBlenderbot writes its params (msgpack of the nested dict), one leaf
    at a time: the nested maps' headers and keys with msgpack's Packer, each leaf with flax's own encoder."""
    serialization = _serialization()
    tree = params_from_tensors({k: _Deferred(v) for k, v in tensors.items()}, config, architecture)
    packer = msgpack.Packer()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            def write(node):
                f.write(packer.pack_map_header(len(node)))
                for key, value in node.items():
                    f.write(packer.pack(key))
                    if isinstance(value, dict):
                        write(value)
                    else:
                        f.write(serialization.msgpack_serialize(value.array()))

            write(tree)


class _Deferred:
    """A tensor to be loaded when written (`.T` marks it for transposition), so the tree holds no data."""

    def __init__(self, tensor, transposed: bool = False):
        self.tensor, self.transposed = tensor, transposed

    @property
    def T(self):  # noqa: N802 - mirrors numpy's attribute, used by params_from_tensors
        return _Deferred(self.tensor, not self.transposed)

    def array(self) -> np.ndarray:
        value = np.asarray(load_tensor(self.tensor))
        return np.ascontiguousarray(value.T) if self.transposed else value
