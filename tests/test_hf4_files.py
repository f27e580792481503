"""Hugging Face's own tf_model.h5 and flax_model.msgpack (written by transformers 4.x) load in all three
backends with the logits transformers 4.x computes.

transformers 4.x (with its TF and Flax classes) cannot share an environment with Keras 3, so this runs only
where BLENDERBOT_MB_HF4_PYTHON names a Python that has it: `nox -s oracle_hf4` builds one and runs this
file. Elsewhere the TF and Flax checkpoint tests check files laid out from the documented naming instead.
"""

import os
import subprocess

import numpy as np
import pytest
from helpers import make_config, random_batch, random_weights, write_checkpoint

PYTHON = os.environ.get("BLENDERBOT_MB_HF4_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="set BLENDERBOT_MB_HF4_PYTHON to a Python with transformers 4.x")
SCRIPT = os.path.join(os.path.dirname(__file__), "oracle_hf4", "write_hf4_files.py")


@pytest.fixture(scope="module")
def hf4(tmp_path_factory):
    config = make_config("odd")
    weights = random_weights(config, seed=7)
    folder = write_checkpoint(tmp_path_factory.mktemp("pt"), config, weights)
    b = random_batch(config, batch=3, src_len=10, tgt_len=6)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    np.savez(os.path.join(folder, "inputs.npz"), **inputs)
    out = str(tmp_path_factory.mktemp("hf4"))
    subprocess.run([PYTHON, SCRIPT, folder, out], check=True, timeout=600)
    return config, weights, inputs, out, dict(np.load(os.path.join(out, "logits.npz")))


def torch_logits(folder, inputs):
    torch = pytest.importorskip("torch")
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    model = BlenderbotForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


@pytest.mark.parametrize("kind, weights_file", [("tf", "tf_model.h5"), ("flax", "flax_model.msgpack")])
def test_hf4_files_load_in_every_backend(hf4, tmp_path, kind, weights_file):
    config, weights, inputs, out, logits = hf4
    folder = os.path.join(out, kind)
    assert os.path.isfile(os.path.join(folder, weights_file))
    np.testing.assert_allclose(torch_logits(folder, inputs), logits[kind], rtol=0, atol=1e-5)
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

    got_tf = TFBlenderbotForConditionalGeneration.from_pretrained(folder)(**inputs).logits
    got_flax = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)(**inputs).logits
    np.testing.assert_allclose(np.asarray(got_tf), logits[kind], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_flax), logits[kind], rtol=0, atol=1e-5)
    # our reader gives back exactly the weights, and our writer lays the file out as transformers 4.x does
    from blenderbot_mb.checkpoint import read_weights

    theirs = read_weights(folder, config, "BlenderbotForConditionalGeneration")
    for name, value in weights.items():
        np.testing.assert_array_equal(np.asarray(theirs[name]), value, err_msg=name)
    ours = str(tmp_path / weights_file)
    if kind == "tf":
        from blenderbot_mb.checkpoint_h5 import write_tf_h5

        write_tf_h5(weights, ours, config, "BlenderbotForConditionalGeneration")
        assert h5_layout(ours) == h5_layout(os.path.join(folder, weights_file))
    else:
        from flax.serialization import msgpack_restore

        from blenderbot_mb.checkpoint_msgpack import write_flax_msgpack

        write_flax_msgpack(weights, ours, config, "BlenderbotForConditionalGeneration")
        with open(ours, "rb") as f, open(os.path.join(folder, weights_file), "rb") as g:
            mine, hf = msgpack_restore(f.read()), msgpack_restore(g.read())
        assert tree_layout(mine) == tree_layout(hf)


def h5_layout(path):
    """Every dataset path and shape, and the layer_names / weight_names attributes Keras reads."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        out["layer_names"] = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        for layer in out["layer_names"]:
            out[layer] = [n.decode() if isinstance(n, bytes) else n for n in f[layer].attrs["weight_names"]]
        f.visititems(lambda name, obj: out.setdefault("datasets", []).append((name, obj.shape))
                     if isinstance(obj, h5py.Dataset) else None)
    out["datasets"] = sorted(out["datasets"])
    return out


def tree_layout(tree, prefix=()):
    if isinstance(tree, dict):
        return sorted(x for k, v in tree.items() for x in tree_layout(v, (*prefix, k)))
    return [(prefix, tuple(np.shape(tree)), str(np.asarray(tree).dtype))]
