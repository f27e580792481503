"""from_pretrained keyword arguments: one rule in the core (checkpoint.load_pretrained), the dtype argument per
backend. Unsupported transformers options raise naming the argument; nothing unknown reaches config.json."""

import json

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

from blenderbot_mb import BlenderbotConfig
from blenderbot_mb.checkpoint import UNSUPPORTED_KWARGS, load_pretrained
from blenderbot_mb.errors import ConfigError

ARCH = "BlenderbotForConditionalGeneration"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = make_config()
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), config, random_weights(config))


@pytest.mark.parametrize("name", ["device_map", "quantization_config", "attn_implementation", "low_cpu_mem_usage",
                                  "trust_remote_code", "from_pt"])
def test_unsupported_transformers_options_raise_naming_the_argument(folder, name):
    assert name in UNSUPPORTED_KWARGS
    with pytest.raises(ConfigError, match=f"does not support {name}="):
        load_pretrained(folder, ARCH, "numpy", **{name: "auto"})


def test_unknown_argument_raises_and_is_never_stored(folder, tmp_path):
    with pytest.raises(ConfigError, match="unknown keyword argument 'no_such_option'"):
        load_pretrained(folder, ARCH, "numpy", no_such_option=1)
    with pytest.raises(ConfigError, match="no_such_option"):
        BlenderbotConfig.from_pretrained(folder, no_such_option=1)
    config, _, _ = load_pretrained(folder, ARCH, "numpy", dropout=0.25)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dropout"] == 0.25 and "no_such_option" not in saved


def test_config_fields_and_generation_settings_are_mapped(folder):
    config, _, generation = load_pretrained(folder, ARCH, "numpy", activation_dropout=0.5, num_beams=4,
                                            max_length=9)
    assert config.activation_dropout == 0.5
    assert (generation.num_beams, generation.max_length) == (4, 9)
    assert "num_beams" not in config.to_dict()


def test_torch_dtype_and_its_new_name(folder):
    torch = pytest.importorskip("torch")
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration as Model

    assert Model.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert Model.from_pretrained(folder, dtype="float16").dtype == torch.float16
    assert Model.from_pretrained(folder, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert Model.from_pretrained(folder).dtype == torch.float32
    with pytest.raises(ConfigError, match="disagree"):
        Model.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="floating torch dtype"):
        Model.from_pretrained(folder, dtype="int8")
    with pytest.raises(ConfigError, match="device_map"):
        Model.from_pretrained(folder, device_map="auto")


def test_tf_dtype_is_a_policy_for_this_model_only(folder):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration as Model

    before = keras.config.dtype_policy().name
    model = Model.from_pretrained(folder, dtype="mixed_bfloat16")
    fc1 = model.model.encoder.layers[0].fc1
    assert (fc1.compute_dtype, fc1.variable_dtype) == ("bfloat16", "float32")
    assert keras.config.dtype_policy().name == before
    ids = np.array([[5, 6, 7, 2]])
    full = Model.from_pretrained(folder)(input_ids=ids, decoder_input_ids=ids).logits
    half = model(input_ids=ids, decoder_input_ids=ids).logits
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=0.1)
    with pytest.raises(ConfigError, match="not a Keras dtype policy"):
        Model.from_pretrained(folder, dtype="int3")


def test_flax_dtype_is_the_compute_dtype(folder):
    jnp = pytest.importorskip("jax.numpy")
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration as Model

    model = Model.from_pretrained(folder, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    with pytest.raises(ConfigError, match="attn_implementation"):
        Model.from_pretrained(folder, attn_implementation="sdpa")
