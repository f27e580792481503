"""Checkpoint folders: ours load in transformers and theirs in ours, with identical logits; clear errors."""

import json
import os

import pytest

torch = pytest.importorskip("torch")

from helpers import hf_model, make_config, random_batch, random_weights, write_checkpoint  # noqa: E402

from blenderbot_mb.errors import CheckpointError, ConfigError  # noqa: E402
from blenderbot_mb.torch import (  # noqa: E402
    BlenderbotForCausalLM,
    BlenderbotForConditionalGeneration,
    BlenderbotModel,
)

ARCH = "BlenderbotForConditionalGeneration"


@pytest.fixture(scope="module")
def tiny():
    config = make_config("odd")
    weights = random_weights(config, seed=2)
    b = random_batch(config)
    inputs = dict(input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"]),
                  decoder_input_ids=torch.from_numpy(b["decoder_input_ids"]))
    return config, weights, inputs


@pytest.fixture
def folder(tmp_path, tiny):
    config, weights, _ = tiny
    return write_checkpoint(tmp_path / "ckpt", config, weights, generation={"num_beams": 3, "max_length": 17})


def test_our_folder_loads_in_transformers(tmp_path, folder, tiny):
    transformers = pytest.importorskip("transformers")
    config, weights, inputs = tiny
    ours = BlenderbotForConditionalGeneration.from_pretrained(folder)
    assert ours.generation_config.num_beams == 3 and ours.generation_config.max_length == 17
    ours.save_pretrained(tmp_path / "saved")
    files = sorted(os.listdir(tmp_path / "saved"))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    theirs = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    assert theirs.generation_config.num_beams == 3


def test_saved_file_has_canonical_names_only(tmp_path, tiny):
    from safetensors import safe_open

    config, weights, _ = tiny
    model = BlenderbotForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(weights)  # no lm_head / embed_tokens copies


def test_transformers_folder_loads_in_ours(tmp_path, tiny):
    config, weights, inputs = tiny
    ref = hf_model(config, weights)
    ref.save_pretrained(tmp_path / "hf")
    ours = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, ref(**inputs).logits)
    # a base-model folder loads into the LM class and the LM folder into the base class, as the reference
    base = BlenderbotModel.from_pretrained(tmp_path / "hf")
    assert torch.equal(base.shared.weight, ours.model.shared.weight)
    causal = BlenderbotForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(causal.model.decoder.layers[0].fc1.weight, ours.model.decoder.layers[0].fc1.weight)


def test_sharded_save_round_trips(tmp_path, tiny):
    config, weights, inputs = tiny
    model = BlenderbotForConditionalGeneration.from_pretrained(write_checkpoint(tmp_path / "a", config, weights))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    again = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_dtype_and_config_overrides(folder):
    model = BlenderbotForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.final_logits_bias.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.shared.weight
    causal = BlenderbotForCausalLM.from_pretrained(folder, add_cross_attention=False)
    assert causal.config.is_decoder and not causal.config.add_cross_attention


def test_missing_extra_and_misshaped_tensors_are_listed(tmp_path, tiny):
    config, weights, _ = tiny
    bad = dict(weights)
    bad.pop("model.encoder.layers.0.fc1.bias")
    bad["model.decoder.layers.0.fc2.weight"] = bad["model.decoder.layers.0.fc2.weight"][:, :3]
    bad["model.extra.weight"] = bad["final_logits_bias"]
    folder = write_checkpoint(tmp_path / "bad", config, bad)
    with pytest.raises(CheckpointError) as err:
        BlenderbotForConditionalGeneration.from_pretrained(folder)
    text = str(err.value)
    for name in ("model.encoder.layers.0.fc1.bias", "model.decoder.layers.0.fc2.weight", "model.extra.weight"):
        assert name in text


def test_truncated_safetensors_file(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        BlenderbotForConditionalGeneration.from_pretrained(folder)


def test_pickle_needs_opt_in(tmp_path, tiny):
    config, weights, inputs = tiny
    folder = tmp_path / "pickle"
    config.save_pretrained(folder)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        BlenderbotForConditionalGeneration.from_pretrained(folder)
    model = BlenderbotForConditionalGeneration.from_pretrained(folder, allow_pickle=True)
    assert torch.equal(model.model.shared.weight, torch.from_numpy(weights["model.shared.weight"]))


def test_pickle_written_on_request_loads_here_and_in_transformers(tmp_path, folder, tiny):
    transformers = pytest.importorskip("transformers")
    _, _, inputs = tiny
    ours = BlenderbotForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "bin")) == ["config.json", "generation_config.json", "pytorch_model.bin"]
    with pytest.raises(CheckpointError, match="allow_pickle"):
        BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "bin")
    again = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "bin", allow_pickle=True)
    theirs = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "bin").eval()
    with torch.no_grad():
        expected = ours(**inputs).logits
        assert torch.equal(again(**inputs).logits, expected) and torch.equal(theirs(**inputs).logits, expected)


def test_malformed_config_json(folder):
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        BlenderbotForConditionalGeneration.from_pretrained(folder)
    with open(path, "w") as f:
        json.dump({"d_model": 10, "encoder_attention_heads": 3}, f)
    with pytest.raises(ConfigError, match="d_model"):
        BlenderbotForConditionalGeneration.from_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError):
        BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "nothing-here")


def test_base_model_folder_loads_into_the_lm_class_like_transformers(tmp_path, tiny):
    """A BlenderbotModel folder has no final_logits_bias: the LM class starts it at zeros, as transformers does."""
    transformers = pytest.importorskip("transformers")
    config, weights, inputs = tiny
    hf_config = transformers.BlenderbotConfig(**config.to_dict())
    base = transformers.BlenderbotModel(hf_config).eval()
    base.save_pretrained(tmp_path / "base")
    theirs = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    ours = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "base")
    assert not ours.final_logits_bias.any() and not ours.final_logits_bias.is_meta
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=1e-5)


def test_tf_and_flax_files_load_in_torch(tmp_path, tiny):
    """HF's tf_model.h5 and flax_model.msgpack (numpy readers) load in the PyTorch backend too."""
    pytest.importorskip("h5py")
    from blenderbot_mb.checkpoint_h5 import write_tf_h5

    config, weights, inputs = tiny
    ref = hf_model(config, weights)
    write_checkpoint(tmp_path / "tf", config, weights)
    os.remove(tmp_path / "tf" / "model.safetensors")
    write_tf_h5(weights, str(tmp_path / "tf" / "tf_model.h5"), config, ARCH)
    ours = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "tf")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, ref(**inputs).logits)
