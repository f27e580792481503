"""Checkpoints for the Flax backend: HF-layout safetensors from any backend, and HF's flax_model.msgpack.

transformers 5 has no Flax classes and its 4.x release cannot share this environment, so the msgpack
that Hugging Face's FlaxBlenderbot writes is built here by hand from its documented layout (nested
dict, Dense kernels [in, out], LayerNorm scale/bias, Embed embedding, final_logits_bias at the top,
layers under '0', '1', ...), serialized with flax.serialization.msgpack_serialize as HF's to_bytes does.
"""

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402
from helpers import hf_model, make_config, random_batch, random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb.checkpoint_msgpack import read_flax_msgpack  # noqa: E402
from blenderbot_mb.errors import CheckpointError  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, FlaxBlenderbotModel  # noqa: E402

LM = "BlenderbotForConditionalGeneration"


def hf_flax_tree(weights):
    """HF's FlaxBlenderbot params from PyTorch-named weights, by the documented renames (independent of ours)."""
    tree = {}
    for name, value in weights.items():
        parts = name.split(".")
        if name == "final_logits_bias":
            tree["final_logits_bias"] = value
            continue
        *path, leaf = parts
        last = path[-1]
        if last in ("shared", "embed_positions"):
            leaf, value = "embedding", value
        elif "norm" in last:
            leaf = "scale" if leaf == "weight" else "bias"
        elif leaf == "weight":  # Dense: kernel is the transpose
            leaf, value = "kernel", value.T
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value)
    return tree


def test_hf_flax_msgpack_loads_with_identical_logits(tmp_path):
    torch = pytest.importorskip("torch")
    config = make_config("odd")
    weights = random_weights(config, LM, seed=1)
    folder = tmp_path / "hf_flax"
    folder.mkdir()
    config.replace(architectures=["FlaxBlenderbotForConditionalGeneration"]).save_pretrained(folder)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(hf_flax_tree(weights)))
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    batch = random_batch(config)
    out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    with torch.no_grad():
        ref = hf_model(config, weights, LM)(input_ids=torch.from_numpy(batch["input_ids"]),
                                            attention_mask=torch.from_numpy(batch["attention_mask"]),
                                            decoder_input_ids=torch.from_numpy(batch["decoder_input_ids"]))
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)


def test_msgpack_write_read_round_trip_in_hf_layout(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, LM, seed=2)
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(write_checkpoint(tmp_path / "st", config, weights))
    model.save_pretrained(tmp_path / "mp", safe_serialization=False)
    written = serialization.msgpack_restore((tmp_path / "mp" / "flax_model.msgpack").read_bytes())
    expected = hf_flax_tree(weights)
    assert jax.tree_util.tree_structure(written) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(written), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    back = read_flax_msgpack(str(tmp_path / "mp" / "flax_model.msgpack"), config)
    assert set(back) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v)
    again = FlaxBlenderbotForConditionalGeneration.from_pretrained(tmp_path / "mp")
    batch = random_batch(config, batch=2)
    np.testing.assert_array_equal(
        np.asarray(again(batch["input_ids"], batch["attention_mask"]).logits),
        np.asarray(model(batch["input_ids"], batch["attention_mask"]).logits))


def test_safetensors_round_trip_and_base_model_prefix(tmp_path):
    config = make_config("relu")
    weights = random_weights(config, LM, seed=3)
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(write_checkpoint(tmp_path / "a", config, weights))
    model.save_pretrained(tmp_path / "b")
    saved = FlaxBlenderbotForConditionalGeneration.from_pretrained(tmp_path / "b")
    for k, v in saved.state_dict().items():
        np.testing.assert_array_equal(v, weights[k])
    # the base model loads from the LM checkpoint (prefix rule) and has no 'model' level
    base = FlaxBlenderbotModel.from_pretrained(tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(base.params["shared"]["embedding"]), weights["model.shared.weight"])


def test_bf16_file_loads_as_float32_params_unless_asked(tmp_path):
    import ml_dtypes

    config = make_config("tiny")
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_weights(config, LM, seed=4).items()}
    folder = tmp_path / "bf16"
    folder.mkdir()
    config.save_pretrained(folder)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(hf_flax_tree(weights)))
    fp32 = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    assert {p.dtype for p in jax.tree_util.tree_leaves(fp32.params)} == {jnp.dtype(jnp.float32)}
    kept = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, param_dtype=None, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree_util.tree_leaves(kept.params)} == {jnp.dtype(jnp.bfloat16)}


def test_bad_checkpoints_give_clear_errors(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, LM, seed=5)
    folder = tmp_path / "bad"
    folder.mkdir()
    config.save_pretrained(folder)
    data = serialization.msgpack_serialize(hf_flax_tree(weights))
    (folder / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    tree = hf_flax_tree(weights)
    del tree["model"]["decoder"]["layers"]["1"]["fc2"]
    tree["model"]["encoder"]["layer_norm"]["scale"] = np.ones(3, np.float32)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(CheckpointError) as err:
        FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    assert "model.decoder.layers.1.fc2.weight" in str(err.value)
    assert "model.encoder.layer_norm.weight" in str(err.value)


def test_reference_flax_params_api(tmp_path):
    """transformers 4.37's Flax params API: from_pretrained(_do_init=False) gives (model, params) with the
    params outside the model; init_weights(rng, shape, params) fills in what params lack; init_cache takes
    the encoder outputs; to_fp16/to_bf16/to_fp32 take a mask; a params setter that lacks a parameter or has
    one of another shape raises ValueError naming it."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    config = make_config("tiny")
    weights = random_weights(config, seed=3)
    folder = write_checkpoint(tmp_path / "m", config, weights)
    batch = random_batch(config, batch=2)
    model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)
    bare, params = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, _do_init=False)
    with pytest.raises(ValueError, match="_do_init=False"):
        _ = bare.params
    expected = np.asarray(model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits)
    got = bare(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"], params=params).logits
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(np.asarray(params["model"]["shared"]["embedding"]), weights["model.shared.weight"])

    flat = flatten_dict(params)
    gone = ("model", "decoder", "layer_norm", "scale")
    partial_params = unflatten_dict({k: v for k, v in flat.items() if k != gone})
    filled = flatten_dict(model.init_weights(jax.random.PRNGKey(1), (1, 1), params=partial_params))
    assert set(filled) == set(flat) and filled[gone].shape == flat[gone].shape
    assert all(np.array_equal(filled[k], flat[k]) for k in flat if k != gone)
    with pytest.raises(ValueError, match="missing: model/decoder/layer_norm/scale"):
        model.params = partial_params
    wrong = dict(flat)
    wrong[gone] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"model/decoder/layer_norm/scale \(3,\) \(expected \(16,\)\)"):
        model.params = unflatten_dict(wrong)
    np.testing.assert_array_equal(np.asarray(model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]
                                                   ).logits), expected)  # the refused params changed nothing

    encoded = model.encode(batch["input_ids"])
    with_outputs = model.init_cache(2, 5, encoded)
    assert jax.tree_util.tree_map(jnp.shape, with_outputs) == jax.tree_util.tree_map(jnp.shape, model.init_cache(2, 5))

    half = model.to_fp16()
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype("float16")}
    mask = jax.tree_util.tree_map_with_path(lambda path, _: "layer_norm" not in jax.tree_util.keystr(path),
                                            model.params)
    mixed = flatten_dict(model.to_bf16(mask=mask))
    assert mixed[gone].dtype == jnp.float32 and mixed[("model", "shared", "embedding")].dtype == jnp.bfloat16
    assert flatten_dict(model.to_fp32(half))[gone].dtype == jnp.float32
