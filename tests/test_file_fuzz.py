"""Property-based fuzzing of the weight-file readers: whatever the index JSON, msgpack bytes or h5 layout, only
the package's own errors escape, quickly and without large allocations."""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

from blenderbot_mb.checkpoint import read_weights
from blenderbot_mb.errors import BlenderbotError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ARCH = "BlenderbotForConditionalGeneration"
CONFIG = make_config("tiny")
MEMORY_BUDGET = 32 * 2**20  # far below what a hostile header could ask for
FUZZ = settings(max_examples=30, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["model.shared.weight", "final_logits_bias", "x", "", "../x", "/etc/passwd"])
shard_names = st.sampled_from(["model-00001-of-00002.safetensors", "missing.safetensors", "..", "a/b", "/abs", "",
                               "config.json", "."])


def read_within_budget(folder):
    """read_weights under tracemalloc: a BlenderbotError or success, and a small peak allocation."""
    tracemalloc.start()
    try:
        read_weights(folder, CONFIG, ARCH)
    except BlenderbotError as e:
        assert str(e).strip()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BUDGET, peak


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    write_checkpoint(folder, CONFIG, random_weights(CONFIG), max_shard_size="40KB")
    return str(folder)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(names, shard_names | json_values)}))
def test_index_json(sharded, index):
    path = os.path.join(sharded, "model.safetensors.index.json")
    original = open(path).read()
    try:
        with open(path, "w") as f:
            json.dump(index, f)
        read_within_budget(sharded)
    finally:
        with open(path, "w") as f:
            f.write(original)


def _ext(shape, dtype, payload):
    msgpack = pytest.importorskip("msgpack")
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, payload), use_bin_type=True))


leaves = st.builds(
    _ext,
    st.lists(st.integers(-2, 2**40), max_size=3),
    st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "object", "nonsense", "<f4"]),
    st.binary(max_size=64),
)
trees = st.recursive(leaves | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5) | st.binary(max_size=8),
                     lambda inner: st.dictionaries(st.sampled_from(["model", "params", "shared", "embedding",
                                                                    "final_logits_bias", "kernel", "0", "layers"]),
                                                   inner, max_size=4),
                     max_leaves=10)


@FUZZ
@given(tree=trees, tail=st.binary(max_size=16), cut=st.integers(0, 200))
def test_msgpack(tree, tail, cut):
    msgpack = pytest.importorskip("msgpack")
    data = msgpack.packb(tree, use_bin_type=True)
    with tempfile.TemporaryDirectory() as folder:
        CONFIG.save_pretrained(folder)
        for blob in (data, data + tail, data[: max(0, len(data) - cut)]):
            with open(os.path.join(folder, "flax_model.msgpack"), "wb") as f:
                f.write(blob)
            read_within_budget(folder)


@FUZZ
@given(
    layer_names=st.lists(st.sampled_from(["model", "final_logits_bias", "nope", ""]), max_size=3),
    weights=st.dictionaries(
        st.sampled_from(["final_logits_bias:0", "tf_blenderbot_for_conditional_generation/model/encoder/layer_norm/gamma:0",
                         "model.shared/model.shared/embeddings:0", "x/y:0"]),
        st.tuples(st.lists(st.integers(0, 300), min_size=0, max_size=3),
                  st.sampled_from(["float32", "float16", "int32", "bool", "S3"])),
        max_size=3),
)
def test_h5_layout(layer_names, weights):
    h5py = pytest.importorskip("h5py")
    with tempfile.TemporaryDirectory() as folder:
        CONFIG.save_pretrained(folder)
        with h5py.File(os.path.join(folder, "tf_model.h5"), "w") as f:
            f.attrs["layer_names"] = np.asarray([n.encode() for n in layer_names], dtype="S")
            for layer in {n for n in layer_names if n}:
                group = f.create_group(layer)
                group.attrs["weight_names"] = np.asarray([n.encode() for n in weights], dtype="S")
                for name, (shape, dtype) in weights.items():
                    group.create_dataset(name, data=np.zeros(shape, dtype=dtype))
        read_within_budget(folder)
