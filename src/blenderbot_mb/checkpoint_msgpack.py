"""Hugging Face's `flax_model.msgpack`: the Flax params tree, written with `flax.serialization`.

The tree is nested dicts in Flax names (`model/encoder/layers/0/self_attn/k_proj/kernel`), Linear
kernels [in, out], LayerNorm `scale`/`bias`, embeddings `embedding`, `final_logits_bias` at the top;
a `BlenderbotModel` file has no `model` level. An untied LM head is a Dense `lm_head/kernel` of shape
[d_model, vocab] (HF's FlaxBlenderbot has no `lm_head` entry when the head is tied).

This module is part of the framework-free core: `flax` is imported inside the functions only.
`params_from_tensors` / `tensors_from_params` are also what the Flax backend uses to build its
params from checkpoint tensors and back, so every layout goes through `naming.tensor_specs`.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, MissingBackendError
from .fileio import atomic_path
from .naming import flax_path, flax_transposed, tensor_specs

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


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


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def read_flax_msgpack(path: str, config=None) -> dict[str, Any]:
    """All tensors of a `flax_model.msgpack` as {HF PyTorch name: numpy array in PyTorch layout}.

    Names are derived from the Flax paths alone; `checkpoint.match_weights` then checks them against
    the config and architecture (prefix rule, missing / unexpected / mis-shaped tensors).
    """
    serialization = _serialization()
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises many types for a damaged file
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e}. The file may be truncated or not a Flax msgpack file."
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} does not hold a Flax params tree (got {type(tree).__name__})")
    if set(tree) == {"params"}:  # a variables dict rather than bare params
        tree = tree["params"]
    out = {}
    for keys, value in _flatten(tree):
        if keys == ("final_logits_bias",):
            out["final_logits_bias"] = value
            continue
        *parents, leaf = keys
        if leaf not in _LEAF_TO_TORCH:
            raise CheckpointError(f"{path}: unexpected Flax leaf {'/'.join(keys)}")
        name = ".".join([*parents, _LEAF_TO_TORCH[leaf]])
        out[name] = value.T if leaf == "kernel" else value
    return out


def write_flax_msgpack(tensors: dict[str, Any], path: str, config, architecture: str) -> None:
    """Write canonical tensors as HF's FlaxBlenderbot writes its params (msgpack of the nested dict)."""
    import numpy as np

    serialization = _serialization()
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    data = serialization.msgpack_serialize(params_from_tensors(tensors, config, architecture))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)

