"""Hugging Face's `tf_model.h5`: read and written with h5py alone (no framework).

The file is Keras 2's h5 weights format as `TFPreTrainedModel.save_pretrained` writes it: the root attribute
`layer_names` lists the model's top-level layers ("model", "final_logits_bias"), each layer is a group whose
attribute `weight_names` lists its variables' names, and each weight is a dataset at that name (the `/` in it
make nested groups). Names and layouts come from `naming.tf_weight_name`: Dense kernels [in, out], LayerNorm
`gamma`/`beta`, embeddings `embeddings` (older files: `weight`), a `:0` suffix.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ._backends import require_module
from .checkpoint import StoredTensor, load_tensor
from .checkpoint_safetensors import dtype_name
from .errors import CheckpointError
from .fileio import atomic_path
from .naming import EMBEDDING, LINEAR, TF_ROOT_NAMES, base_architecture, tensor_specs, tf_weight_name

# Keras 2 splits an attribute above this size into name0, name1, ...
HDF5_OBJECT_HEADER_LIMIT = 64512


def _h5py():
    return require_module("h5py", "tf", "Reading and writing tf_model.h5")


def _read_attr(group, name: str) -> list[str]:
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in values]


def _write_attr(group, name: str, values: list[str]) -> None:
    data = np.asarray([v.encode("utf8") for v in values]) if values else np.asarray([])
    chunks = 1
    while data.nbytes > HDF5_OBJECT_HEADER_LIMIT and len(data):
        chunks += 1
        if any(c.nbytes > HDF5_OBJECT_HEADER_LIMIT for c in np.array_split(data, chunks)):
            continue
        for i, chunk in enumerate(np.array_split(data, chunks)):
            group.attrs[f"{name}{i}"] = chunk
        return
    group.attrs[name] = data


def _node(group, name: str, path: str):
    """`group[name]`, reached through hard links only: an external link (another file) or a soft link is
    refused, so every byte read comes from this file."""
    h5py = _h5py()
    node = group
    for part in name.split("/"):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            raise CheckpointError(f"{path} lists a weight it does not hold: {name}")
        if not isinstance(link, h5py.HardLink):
            raise CheckpointError(f"{path}: {name} is reached through an {type(link).__name__}; only data stored "
                                  "in the file itself is read")
        node = node[part]
    return node


def _dataset(group, name: str, path: str):
    """The dataset `name`, refused if its data lives outside the file (external raw files, a virtual dataset)
    or if its storage cannot hold its shape (a chunked dataset with no data reads as fill values)."""
    h5py = _h5py()
    ds = _node(group, name, path)
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{path}: {name} is not a dataset")
    if ds.external or ds.is_virtual:
        raise CheckpointError(f"{path}: dataset {name} keeps its data in other files (h5 external storage or "
                              "a virtual dataset); only data stored in the file itself is read")
    stored, needed = ds.id.get_storage_size(), ds.size * ds.dtype.itemsize
    filtered = ds.id.get_create_plist().get_nfilters() > 0  # compressed data may be smaller than its shape
    if needed and (stored == 0 or (stored < needed and not filtered)):
        raise CheckpointError(f"{path}: dataset {name} of shape {ds.shape} holds {stored} bytes of the {needed} "
                              "it needs; the file is truncated or damaged")
    return ds


def name_map(config) -> dict[str, tuple[str, bool]]:
    """{Keras weight name without the model's own scope: (Hugging Face name, stored transposed)}, derived from
    `naming.tensor_specs` through `naming.tf_weight_name` (the names `write_tf_h5` writes). A `BlenderbotModel`
    file differs only in its scope, so its names map to the LM's and `match_weights` applies the prefix rule.
    Embeddings are also found under the leaf `weight` of older files."""
    out = {}
    for spec in tensor_specs(config, "BlenderbotForConditionalGeneration"):
        _, weight_name = tf_weight_name(spec, "BlenderbotForConditionalGeneration")
        key = _unscoped(weight_name)
        out[key] = (spec.name, spec.kind == LINEAR)
        if spec.kind == EMBEDDING:
            out[key.replace("/embeddings:0", "/weight:0")] = (spec.name, False)
    return out


def _unscoped(weight_name: str) -> str:
    """Drop the model's name scope ("tf_blenderbot_for_conditional_generation/"), which varies with the class."""
    first, _, rest = weight_name.partition("/")
    return rest if rest and first in TF_ROOT_NAMES.values() else weight_name


def open_tf_h5(path: str, config, stack) -> dict[str, StoredTensor]:
    """{Hugging Face name: StoredTensor in PyTorch layout} of a tf_model.h5, from the file's metadata alone.

    The file stays open on `stack`. Names the map does not know are kept as they are, so the checkpoint check
    lists them as unexpected. Only data stored in the file itself is read (see `_node`, `_dataset`).
    """
    h5py = _h5py()
    names = name_map(config)
    out: dict[str, StoredTensor] = {}
    try:
        f = stack.enter_context(h5py.File(path, "r"))
        layer_names = _read_attr(f, "layer_names")
        if not layer_names:
            raise CheckpointError(f"{path} has no 'layer_names' attribute: not a Keras h5 weights file")
        for layer in layer_names:
            group = _node(f, layer, path)
            for weight_name in _read_attr(group, "weight_names"):
                ds = _dataset(group, weight_name, path)
                name, transposed = names.get(_unscoped(weight_name), (weight_name, False))
                shape = tuple(int(d) for d in ds.shape)
                out[name] = StoredTensor(shape[::-1] if transposed else shape, ds.dtype.name,
                                         _reader(ds, transposed, path, weight_name))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file may be truncated or not an h5 file.") from None
    return out


def _reader(ds, transposed: bool, path: str, name: str):
    def read() -> np.ndarray:
        try:
            value = ds[()]
        except OSError as e:
            raise CheckpointError(f"cannot read {name} from {path}: {e}. The file may be truncated.") from None
        return np.ascontiguousarray(value.T) if transposed else value

    return read


def read_tf_h5(path: str, config) -> dict[str, np.ndarray]:
    """{Hugging Face name: numpy array in PyTorch layout} of a tf_model.h5 (names checked by the caller)."""
    with contextlib.ExitStack() as stack:
        return {name: t.load() for name, t in open_tf_h5(path, config, stack).items()}


def write_tf_h5(tensors, path: str, config, architecture: str = "TFBlenderbotForConditionalGeneration") -> None:
    """Write canonical tensors (PyTorch names and layout) as Hugging Face's TFBlenderbot `save_pretrained` does."""
    h5py = _h5py()
    arch = base_architecture(architecture)
    if arch not in ("BlenderbotModel", "BlenderbotForConditionalGeneration"):
        raise CheckpointError(f"Hugging Face has no TF class for {arch}; tf_model.h5 cannot hold it")
    if arch == "BlenderbotForConditionalGeneration" and not config.tie_word_embeddings:
        raise CheckpointError("Hugging Face's TF Blenderbot always ties the LM head; an untied model cannot be "
                              "written as tf_model.h5 (save safetensors instead)")
    wide = [name for name, t in tensors.items() if dtype_name(t) == "bfloat16"]
    if wide:
        raise CheckpointError(f"tf_model.h5 cannot hold bfloat16 tensors ({wide[0]}, ...): HDF5 has no such type. "
                              "Write float32 or float16 (--dtype), or another format (safetensors, flax)")
    groups: dict[str, list[tuple[str, object, bool]]] = {}
    for spec in _keras_order(tensor_specs(config, arch)):
        if spec.name not in tensors:
            raise CheckpointError(f"write_tf_h5: tensor {spec.name} is missing")
        layer, weight_name = tf_weight_name(spec, arch)
        groups.setdefault(layer, []).append((weight_name, tensors[spec.name], spec.kind == LINEAR))
    layer_names = ["model"] + (["final_logits_bias"] if "final_logits_bias" in groups else [])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_attr(f, "layer_names", layer_names)
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = b"2.19.0"
            for layer in sorted(layer_names):  # Keras creates the groups in name order
                group = f.create_group(layer)
                _write_attr(group, "weight_names", [n for n, _, _ in groups[layer]])
                for weight_name, tensor, transposed in groups[layer]:  # one tensor in memory at a time
                    value = np.asarray(load_tensor(tensor))
                    group.create_dataset(weight_name, data=np.ascontiguousarray(value.T) if transposed else value)
            _write_attr(f.create_group("top_level_model_weights"), "weight_names", [])


def _keras_order(specs):
    """Keras lists a layer's weights in the order its sublayers were created; the reference's attention creates
    k, q, v, out (tensor_specs lists k, v, q, out)."""
    rank = {"k_proj": 0, "q_proj": 1, "v_proj": 2, "out_proj": 3}

    def key(item):
        index, spec = item
        parts = spec.name.split(".")
        if len(parts) >= 3 and parts[-2] in rank:
            block = ".".join(parts[:-2])
            first = min(i for i, s in enumerate(specs) if s.name.startswith(block + "."))
            return (first, rank[parts[-2]], parts[-1] != "weight")
        return (index, 0, False)

    return [s for _, s in sorted(enumerate(specs), key=key)]
