"""Hugging Face's tf_model.h5: load a file laid out as HF's TFBlenderbot writes it, write one, round-trip.

transformers 4.x with TensorFlow (the oracle that writes real tf_model.h5 files) cannot be installed beside
Keras 3 here, so `hf_layout_h5` builds the file in the test from the naming documented in transformers 4.57's
modeling_tf_blenderbot.py / modeling_tf_utils.py (Keras 2 `save_weights`: root `layer_names`, one group per
top-level layer with `weight_names`, variables under the model's name scope, the shared embedding in the
absolute scope "model.shared/model.shared/", Dense kernels [in, out], LayerNorm gamma/beta, `:0` suffixes).
"""

import h5py
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from helpers import make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb.checkpoint import read_weights  # noqa: E402
from blenderbot_mb.checkpoint_h5 import read_tf_h5, write_tf_h5  # noqa: E402
from blenderbot_mb.errors import CheckpointError  # noqa: E402
from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration, TFBlenderbotModel  # noqa: E402

ROOT = "tf_blenderbot_for_conditional_generation"
LEAF = {"weight": "kernel", "bias": "bias"}


def hf_name(pt_name, root=ROOT, embedding_leaf="embeddings"):
    """Written out by hand from HF's TF classes (independent of naming.tf_weight_name)."""
    if pt_name == "final_logits_bias":
        return "final_logits_bias", "final_logits_bias:0"
    if pt_name == "model.shared.weight":
        return "model", f"model.shared/model.shared/{embedding_leaf}:0"
    parts = pt_name.split(".")
    module, leaf = parts[:-1], parts[-1]
    scopes = [root, "model", module[1]]  # model / encoder|decoder
    rest = module[2:]
    if rest[0] == "layers":
        scopes.append(f"layers.{rest[1]}")
        rest = rest[2:]
    scopes += rest
    if "embed_positions" in module:
        tf_leaf = embedding_leaf
    elif "norm" in module[-1]:
        tf_leaf = {"weight": "gamma", "bias": "beta"}[leaf]
    else:
        tf_leaf = LEAF[leaf]
    return "model", "/".join(scopes + [tf_leaf]) + ":0"


def hf_layout_h5(path, weights, embedding_leaf="embeddings", root=ROOT):
    groups = {}
    for name, value in weights.items():
        layer, wname = hf_name(name, root, embedding_leaf)
        if wname.endswith("/kernel:0"):
            value = value.T
        groups.setdefault(layer, []).append((wname, value))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.asarray([b"model", b"final_logits_bias"])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for layer, items in groups.items():
            g = f.create_group(layer)
            g.attrs["weight_names"] = np.asarray([n.encode() for n, _ in items])
            for n, v in items:
                g.create_dataset(n, data=v)


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"]).logits.numpy()


@pytest.mark.parametrize("embedding_leaf", ["embeddings", "weight"])  # 4.3x+ files and older ones
def test_hf_layout_h5_loads_with_identical_logits(tmp_path, embedding_leaf):
    config = make_config("odd")
    weights = random_weights(config, seed=11)
    config.replace(architectures=["BlenderbotForConditionalGeneration"]).save_pretrained(tmp_path)
    hf_layout_h5(tmp_path / "tf_model.h5", weights, embedding_leaf)
    model = TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path)
    reference = TFBlenderbotForConditionalGeneration(config)
    reference.load_weights_dict(weights)
    batch = random_batch(config)
    np.testing.assert_array_equal(logits(model, batch), logits(reference, batch))
    # and the base model reads the same file
    bare = TFBlenderbotModel.from_pretrained(tmp_path)
    np.testing.assert_array_equal(bare.state_dict()["decoder.layers.2.fc1.weight"],
                                  weights["model.decoder.layers.2.fc1.weight"])


def test_written_h5_has_hf_layout_and_round_trips(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, seed=12)
    ours, theirs = tmp_path / "ours.h5", tmp_path / "theirs.h5"
    write_tf_h5(weights, str(ours), config, "TFBlenderbotForConditionalGeneration")
    hf_layout_h5(theirs, weights)
    with h5py.File(ours, "r") as a, h5py.File(theirs, "r") as b:
        assert [x.decode() for x in a.attrs["layer_names"]] == ["model", "final_logits_bias"]
        for layer in ("model", "final_logits_bias"):
            names_a = [x.decode() for x in a[layer].attrs["weight_names"]]
            names_b = [x.decode() for x in b[layer].attrs["weight_names"]]
            assert sorted(names_a) == sorted(names_b)
            for n in names_b:
                np.testing.assert_array_equal(a[layer][n][()], b[layer][n][()])
        # Keras lists the reference's attention projections k, q, v, out
        names = [x.decode() for x in a["model"].attrs["weight_names"]]
        layer0 = [n for n in names if "/encoder/layers.0/self_attn/" in n and n.endswith("kernel:0")]
        assert [n.split("/")[-2] for n in layer0] == ["k_proj", "q_proj", "v_proj", "out_proj"]
    back = read_tf_h5(str(ours), config)
    assert set(back) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v)


def test_save_pretrained_h5_and_reload(tmp_path):
    config = make_config("tiny")
    model = TFBlenderbotForConditionalGeneration(config)
    model.load_weights_dict(random_weights(config, seed=13))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "tf_model.h5").exists() and not (tmp_path / "model.safetensors").exists()
    again = TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path)
    batch = random_batch(config)
    np.testing.assert_array_equal(logits(again, batch), logits(model, batch))


def test_bad_h5_files(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config)
    config.save_pretrained(tmp_path)
    del weights["model.encoder.layer_norm.bias"]
    hf_layout_h5(tmp_path / "tf_model.h5", weights)
    with pytest.raises(CheckpointError, match="model.encoder.layer_norm.bias"):
        read_weights(str(tmp_path), config, "BlenderbotForConditionalGeneration")
    (tmp_path / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)  # truncated
    with pytest.raises(CheckpointError, match="cannot read"):
        TFBlenderbotForConditionalGeneration.from_pretrained(tmp_path)
