"""Conversions between checkpoint formats: bit-identical round trips, sharding, ParlAI originals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import hf_model, make_config, random_batch, random_weights, write_checkpoint

from blenderbot_mb import GenerationConfig
from blenderbot_mb.checkpoint import read_weights
from blenderbot_mb.convert import convert_checkpoint
from blenderbot_mb.errors import CheckpointError, ConfigError, InputError

ARCH = "BlenderbotForConditionalGeneration"


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit-identical, not just close


@pytest.fixture
def source(tmp_path):
    config = make_config("odd")
    weights = random_weights(config, seed=3)
    folder = write_checkpoint(tmp_path / "src", config, weights, generation={"num_beams": 3, "max_length": 20})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({"<pad>": 0}, f)  # stands in for the tokenizer files that must travel along
    return folder, config, weights


def test_round_trip_safetensors_tf_flax_safetensors(source, tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("flax.serialization")
    folder, config, weights = source
    h5 = convert_checkpoint(folder, tmp_path / "h5", to="tf")
    assert sorted(os.listdir(h5)) == ["config.json", "generation_config.json", "tf_model.h5", "vocab.json"]
    msgpack = convert_checkpoint(h5, tmp_path / "msgpack", to="flax")
    assert "flax_model.msgpack" in os.listdir(msgpack)
    back = convert_checkpoint(msgpack, tmp_path / "back", to="safetensors")
    assert_same_tensors(read_weights(back, config, ARCH), weights)
    assert_same_tensors(read_weights(h5, config, ARCH), weights)
    assert_same_tensors(read_weights(msgpack, config, ARCH), weights)
    for name in ("config.json", "generation_config.json", "vocab.json"):
        with open(os.path.join(folder, name)) as f, open(os.path.join(back, name)) as g:
            assert json.load(f) == json.load(g), name


def test_tf_h5_holds_keras_layout(source, tmp_path):
    """The h5 file is not just our own round trip: Dense kernels are stored transposed ([in, out])."""
    h5py = pytest.importorskip("h5py")
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "h5", to="tf")
    found = {}

    def collect(name, obj):  # returns None, so visititems walks the whole file
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[()]

    with h5py.File(os.path.join(out, "tf_model.h5"), "r") as f:
        f.visititems(collect)
    key = [k for k in found if "encoder" in k and "layers.0" in k.replace("/", ".") and "fc1" in k and "kernel" in k]
    assert len(key) == 1, sorted(found)[:20]
    np.testing.assert_array_equal(found[key[0]], weights["model.encoder.layers.0.fc1.weight"].T)


def test_sharded_output(source, tmp_path):
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "sharded", to="safetensors", max_shard_size="20KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(weights)
    for shard in shards:  # every shard stays under the limit unless it holds one tensor bigger than it
        size = os.path.getsize(os.path.join(out, shard))
        assert size < 20_000 + 2_000 or len([k for k, v in index["weight_map"].items() if v == shard]) == 1
    assert_same_tensors(read_weights(out, config, ARCH), weights)
    # and back to one file
    single = convert_checkpoint(out, tmp_path / "single")
    assert "model.safetensors" in os.listdir(single)
    assert_same_tensors(read_weights(single, config, ARCH), weights)


def test_pytorch_bin_needs_opt_in(source, tmp_path):
    pytest.importorskip("torch")
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "bin", to="pt")
    assert "pytorch_model.bin" in os.listdir(out)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert_checkpoint(out, tmp_path / "refused")
    back = convert_checkpoint(out, tmp_path / "back", allow_pickle=True)
    assert_same_tensors(read_weights(back, config, ARCH), weights)



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pytorch_bin_loads_in_torch_and_transformers(source, tmp_path, dtype):
    """The streamed `pytorch_model.bin`: plain torch.load gives every tensor bit-exact in its own storage, and
    transformers loads it and saves it again as safetensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, config, weights = source
    out = convert_checkpoint(folder, tmp_path / "bin", to="pt", dtype=dtype)
    state = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    expected = {name: torch.from_numpy(w).to(getattr(torch, dtype)) for name, w in weights.items()}
    assert sorted(state) == sorted(expected)
    for name, t in state.items():
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
        assert t.untyped_storage().nbytes() == t.nbytes, name  # one storage per tensor, nothing shared
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)
    theirs = transformers.BlenderbotForConditionalGeneration.from_pretrained(out, dtype=getattr(torch, dtype))
    loaded = theirs.state_dict()
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name
    theirs.save_pretrained(tmp_path / "hf")
    resaved = read_weights(tmp_path / "hf", config, ARCH, framework="pt")
    assert sorted(resaved) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(resaved[name], t), name


def test_pytorch_bin_refuses_a_tensor_unlike_its_description(tmp_path):
    pytest.importorskip("torch")
    from blenderbot_mb.checkpoint import StoredTensor
    from blenderbot_mb.checkpoint_pickle import write_pickle

    bad = {"x": StoredTensor((2, 3), "float32", lambda: np.zeros((3, 2), np.float32))}
    with pytest.raises(CheckpointError, match="tensor x does not have the shape"):
        write_pickle(bad, str(tmp_path / "x.bin"))

def test_bad_inputs(source, tmp_path):
    folder, _, _ = source
    with pytest.raises(InputError, match="onnx"):
        convert_checkpoint(folder, tmp_path / "x", to="onnx")
    with pytest.raises(CheckpointError, match="no model folder"):
        convert_checkpoint(str(tmp_path / "missing"), tmp_path / "x")
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(folder, "model.safetensors")) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(folder, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


# ---------------------------------------------------------------------- ParlAI originals
def parlai_checkpoint(config, seed=0):
    """Random weights under ParlAI's own module names, and the same arrays under HF names (mapped here by
    hand from the two models' layouts: ParlAI TransformerGeneratorModel vs. HF BlenderbotForConditionalGeneration)."""
    rng = np.random.default_rng(seed)
    parlai, hf = {}, {}

    def put(parlai_name, hf_name, shape, base=0.0):
        t = (base + rng.normal(0, 0.2, shape)).astype(np.float32)
        parlai[parlai_name] = t
        if hf_name:
            hf[hf_name] = t
        return t

    d, v = config.d_model, config.vocab_size
    emb = put("embeddings.weight", "model.shared.weight", (v, d))
    parlai["encoder.embeddings.weight"] = emb  # ParlAI's state dict repeats the shared table in both stacks
    parlai["decoder.embeddings.weight"] = emb
    parlai["START"] = np.array([config.decoder_start_token_id])
    for stack, n, ffn in (("encoder", config.encoder_layers, config.encoder_ffn_dim),
                          ("decoder", config.decoder_layers, config.decoder_ffn_dim)):
        put(f"{stack}.position_embeddings.weight", f"model.{stack}.embed_positions.weight",
            (config.max_position_embeddings, d))
        put(f"{stack}.norm_embeddings.weight", f"model.{stack}.layer_norm.weight", (d,), 1.0)
        put(f"{stack}.norm_embeddings.bias", f"model.{stack}.layer_norm.bias", (d,))
        for i in range(n):
            p, h = f"{stack}.layers.{i}", f"model.{stack}.layers.{i}"
            if stack == "encoder":
                attns = [("attention", "self_attn")]
                norms = [("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm")]
            else:
                attns = [("self_attention", "self_attn"), ("encoder_attention", "encoder_attn")]
                norms = [("norm1", "self_attn_layer_norm"), ("norm2", "encoder_attn_layer_norm"),
                         ("norm3", "final_layer_norm")]
            for pa, ha in attns:
                for pl, hl in (("q_lin", "q_proj"), ("k_lin", "k_proj"), ("v_lin", "v_proj"), ("out_lin", "out_proj")):
                    put(f"{p}.{pa}.{pl}.weight", f"{h}.{ha}.{hl}.weight", (d, d))
                    put(f"{p}.{pa}.{pl}.bias", f"{h}.{ha}.{hl}.bias", (d,))
            for pn, hn in norms:
                put(f"{p}.{pn}.weight", f"{h}.{hn}.weight", (d,), 1.0)
                put(f"{p}.{pn}.bias", f"{h}.{hn}.bias", (d,))
            put(f"{p}.ffn.lin1.weight", f"{h}.fc1.weight", (ffn, d))
            put(f"{p}.ffn.lin1.bias", f"{h}.fc1.bias", (ffn,))
            put(f"{p}.ffn.lin2.weight", f"{h}.fc2.weight", (d, ffn))
            put(f"{p}.ffn.lin2.bias", f"{h}.fc2.bias", (d,))
    hf["final_logits_bias"] = np.zeros((1, v), np.float32)  # ParlAI has no output bias
    opt = {
        "n_heads": config.encoder_attention_heads, "n_layers": config.encoder_layers,
        "n_encoder_layers": config.encoder_layers, "n_decoder_layers": config.decoder_layers,
        "embedding_size": d, "ffn_size": config.encoder_ffn_dim, "n_positions": config.max_position_embeddings,
        "variant": "prelayernorm", "activation": config.activation_function, "embeddings_scale": config.scale_embedding,
        "dropout": 0.1, "attention_dropout": 0.0, "relu_dropout": 0.0, "dict_tokenizer": "bytelevelbpe",
        "beam_size": 4, "beam_min_length": 5, "beam_block_ngram": 3, "beam_context_block_ngram": 3,
        "beam_length_penalty": 0.65, "dict_nulltoken": "__null__", "dict_starttoken": "__start__",
        "dict_endtoken": "__end__", "dict_unktoken": "__unk__",
    }
    return parlai, hf, opt


def save_parlai(path, parlai, opt):
    import torch

    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in parlai.items()}, "opt": opt}, path)
    return str(path)


@pytest.fixture
def parlai_file(tmp_path):
    pytest.importorskip("torch")
    # a ParlAI model has one ffn size for both stacks and the same heads in both
    config = make_config("tiny", decoder_layers=3, encoder_ffn_dim=40, decoder_ffn_dim=40)
    parlai, hf, opt = parlai_checkpoint(config)
    return save_parlai(tmp_path / "blender.pt", parlai, opt), config, hf


def test_parlai_refused_without_opt_in(parlai_file, tmp_path):
    path, _, _ = parlai_file
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert_checkpoint(path, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_parlai_conversion_weights_and_config(parlai_file, tmp_path):
    path, config, hf = parlai_file
    out = convert_checkpoint(path, tmp_path / "out", allow_pickle=True)
    with open(os.path.join(out, "config.json")) as f:
        data = json.load(f)
    for key in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "encoder_ffn_dim", "max_position_embeddings", "activation_function", "scale_embedding"):
        assert data[key] == getattr(config, key), key
    assert (data["pad_token_id"], data["bos_token_id"], data["eos_token_id"], data["decoder_start_token_id"]) == (0, 1, 2, 1)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.num_beams, generation.min_length, generation.no_repeat_ngram_size) == (4, 5, 3)
    assert generation.length_penalty == 0.65
    assert_same_tensors(read_weights(out, config, ARCH), hf)


def test_parlai_logits_match_transformers(parlai_file, tmp_path):
    torch = pytest.importorskip("torch")
    backend = pytest.importorskip("blenderbot_mb.torch")
    if not hasattr(backend, "BlenderbotForConditionalGeneration"):
        pytest.skip("torch backend not available yet")
    path, config, hf = parlai_file
    out = convert_checkpoint(path, tmp_path / "out", allow_pickle=True)
    ours = backend.BlenderbotForConditionalGeneration.from_pretrained(out).eval()
    ref = hf_model(config, hf)
    batch = {k: torch.from_numpy(v) for k, v in random_batch(config).items() if k != "labels"}
    with torch.no_grad():
        a = ours(**batch).logits.numpy()
        b = ref(**batch).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_parlai_bad_options(tmp_path):
    pytest.importorskip("torch")
    config = make_config("tiny")
    parlai, _, opt = parlai_checkpoint(config)
    with pytest.raises(ConfigError, match="variant"):
        convert_checkpoint(save_parlai(tmp_path / "a.pt", parlai, {**opt, "variant": "xlm"}), tmp_path / "a",
                           allow_pickle=True)
    with pytest.raises(ConfigError, match="embedding_size"):
        convert_checkpoint(save_parlai(tmp_path / "b.pt", parlai, {**opt, "embedding_size": 8}), tmp_path / "b",
                           allow_pickle=True)
    del parlai["decoder.layers.1.norm3.bias"]
    parlai["decoder.layers.1.norm4.bias"] = parlai["decoder.layers.1.norm3.weight"]
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(save_parlai(tmp_path / "c.pt", parlai, opt), tmp_path / "c", allow_pickle=True)
    assert "model.decoder.layers.1.final_layer_norm.bias" in str(e.value)
    assert "decoder.layers.1.norm4.bias" in str(e.value)
