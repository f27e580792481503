"""Core checkpoint I/O: framework-free (numpy) reading, checking and writing."""

import json
import os

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

from blenderbot_mb import CheckpointError
from blenderbot_mb.checkpoint import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    match_weights,
    parse_size,
    read_weights,
    write_safetensors,
)
from blenderbot_mb.naming import flax_path, tensor_names, tensor_specs, tied_aliases

ARCH = "BlenderbotForConditionalGeneration"


def test_tensor_names_match_transformers():
    transformers = pytest.importorskip("transformers")
    config = make_config("odd")
    hf_config = transformers.BlenderbotConfig(**config.to_dict())
    for arch in ("BlenderbotModel", "BlenderbotForConditionalGeneration"):
        model = getattr(transformers, arch)(hf_config)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ours = tensor_names(config, arch)
        aliases = tied_aliases(config, arch)
        assert set(state) == set(ours) | set(aliases)
        for name, shape in ours.items():
            assert state[name] == shape, name


def test_param_count_of_presets():
    from blenderbot_mb import BlenderbotConfig

    counts = {}
    for name in ("blenderbot-400M-distill", "blenderbot-3B"):
        names = tensor_names(BlenderbotConfig.from_preset(name))
        counts[name] = sum(int(np.prod(s)) for s in names.values())
    # the published sizes: ~365M and ~2.7B parameters
    assert 360e6 < counts["blenderbot-400M-distill"] < 370e6
    assert 2.6e9 < counts["blenderbot-3B"] < 2.8e9


def test_flax_paths():
    config = make_config()
    paths = {flax_path(s): s for s in tensor_specs(config, ARCH)}
    assert ("model", "encoder", "layers", "0", "self_attn", "k_proj", "kernel") in paths
    assert ("model", "decoder", "layers", "1", "encoder_attn_layer_norm", "scale") in paths
    assert ("model", "shared", "embedding") in paths
    assert ("final_logits_bias",) in paths


def test_single_file_round_trip(tmp_path):
    config = make_config()
    weights = random_weights(config)
    write_checkpoint(tmp_path, config, weights)
    assert os.path.isfile(tmp_path / SAFE_WEIGHTS_NAME)
    loaded = read_weights(str(tmp_path), config, ARCH)
    assert list(loaded) == list(weights)
    for k in weights:
        np.testing.assert_array_equal(loaded[k], weights[k])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_sharded_round_trip(tmp_path):
    config = make_config()
    weights = random_weights(config)
    total = sum(w.nbytes for w in weights.values())
    files = write_safetensors(weights, str(tmp_path), max_shard_size=total // 3)
    assert SAFE_WEIGHTS_INDEX_NAME in files and len(files) >= 4
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(weights) and index["metadata"]["total_size"] == total
    loaded = read_weights(str(tmp_path), config, ARCH)
    for k in weights:
        np.testing.assert_array_equal(loaded[k], weights[k])
    # writing a single file afterwards removes the stale index, so the folder holds one checkpoint
    write_safetensors(weights, str(tmp_path))
    assert not os.path.exists(tmp_path / SAFE_WEIGHTS_INDEX_NAME)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(17) == 17


def test_tied_copies_and_prefix_rule():
    config = make_config()
    weights = random_weights(config)
    with_copies = dict(weights)
    with_copies["lm_head.weight"] = weights["model.shared.weight"]
    with_copies["model.encoder.embed_tokens.weight"] = weights["model.shared.weight"]
    assert list(match_weights(with_copies, config, ARCH)) == list(weights)
    # a BlenderbotModel file (no `model.` prefix) loads into the base class, and the LM file too
    base = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    assert set(match_weights(weights, config, "BlenderbotModel")) == set(base)
    lm = match_weights({**base, "final_logits_bias": weights["final_logits_bias"]}, config, ARCH)
    assert set(lm) == set(weights)
    # without final_logits_bias (a BlenderbotModel file), the LM class gets zeros, as the reference initializes it
    lm = match_weights(base, config, ARCH)
    assert set(lm) == set(weights)
    np.testing.assert_array_equal(lm["final_logits_bias"], np.zeros((1, config.vocab_size), np.float32))


def test_mismatches_are_listed_by_name():
    config = make_config()
    weights = random_weights(config)
    bad = dict(weights)
    del bad["model.decoder.layers.1.fc2.bias"]
    del bad["model.encoder.layer_norm.weight"]
    bad["model.decoder.layers.7.fc1.weight"] = np.zeros((2, 2), np.float32)
    bad["model.encoder.layers.0.fc1.weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(CheckpointError) as e:
        match_weights(bad, config, ARCH, source="x.safetensors")
    msg = str(e.value)
    for name in ("model.decoder.layers.1.fc2.bias", "model.encoder.layer_norm.weight",
                 "model.decoder.layers.7.fc1.weight", "model.encoder.layers.0.fc1.weight"):
        assert name in msg
    assert "missing tensors (2)" in msg and "unexpected tensors (1)" in msg and "(3, 16)" in msg


def test_truncated_file(tmp_path):
    config = make_config()
    write_checkpoint(tmp_path, config, random_weights(config))
    path = tmp_path / SAFE_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_weights(str(tmp_path), config, ARCH)


def test_no_weights_and_pickle_needs_opt_in(tmp_path):
    config = make_config()
    with pytest.raises(CheckpointError, match="no weights"):
        read_weights(str(tmp_path), config, ARCH)
    torch = pytest.importorskip("torch")
    weights = random_weights(config)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        read_weights(str(tmp_path), config, ARCH)
    loaded = read_weights(str(tmp_path), config, ARCH, framework="pt", allow_pickle=True)
    np.testing.assert_array_equal(loaded["final_logits_bias"].numpy(), weights["final_logits_bias"])


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    torch = pytest.importorskip("torch")
    config = make_config()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_weights(str(tmp_path), config, ARCH, allow_pickle=True)


def test_failed_write_leaves_previous_file(tmp_path):
    config = make_config()
    weights = random_weights(config)
    write_safetensors(weights, str(tmp_path))
    before = (tmp_path / SAFE_WEIGHTS_NAME).read_bytes()
    broken = dict(weights)
    broken["x"] = object()  # not a tensor: the writer fails midway
    with pytest.raises(AttributeError):
        write_safetensors(broken, str(tmp_path))
    assert (tmp_path / SAFE_WEIGHTS_NAME).read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
