"""resize_token_embeddings: PyTorch against transformers' own resize, TF and Flax against PyTorch."""

import numpy as np
import pytest
from helpers import hf_model, make_config, random_batch, random_weights

from blenderbot_mb.checkpoint_msgpack import params_from_tensors
from blenderbot_mb.errors import ConfigError
from blenderbot_mb.naming import tied_aliases

torch = pytest.importorskip("torch")
from blenderbot_mb.torch import BlenderbotForCausalLM, BlenderbotForConditionalGeneration  # noqa: E402

LM = "BlenderbotForConditionalGeneration"


def torch_model(config, weights, cls=BlenderbotForConditionalGeneration):
    model = cls(config).eval()
    arch = cls.architecture
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= set(tied_aliases(config, arch))
    return model


def ids_with_new_tokens(new_size):
    batch = random_batch(make_config(vocab_size=min(128, new_size)), batch=2, src_len=6, tgt_len=5)
    batch["input_ids"][0, 1] = batch["decoder_input_ids"][1, 2] = new_size - 1  # a new token, if any
    return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}


def torch_logits(model, batch):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("new_size,multiple", [(133, None), (120, None), (130, 64)])
def test_torch_matches_transformers_resize(tied, new_size, multiple):
    weights = random_weights(make_config(tie_word_embeddings=tied))
    ref = hf_model(make_config(tie_word_embeddings=tied), weights)
    model = torch_model(make_config(tie_word_embeddings=tied), weights)
    ref_emb = ref.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    emb = model.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    size = ref.config.vocab_size
    assert emb.weight.shape == ref_emb.weight.shape == (size, 16) and model.config.vocab_size == size
    assert model.final_logits_bias.shape == ref.final_logits_bias.shape == (1, size)
    assert (model.lm_head.weight is emb.weight) == tied and model.lm_head.out_features == size
    # transformers samples new rows within ~1e-5 of the old rows' mean; ours are the mean
    np.testing.assert_allclose(emb.weight.detach(), ref_emb.weight.detach(), atol=1e-4)
    np.testing.assert_allclose(model.lm_head.weight.detach(), ref.lm_head.weight.detach(), atol=1e-4)
    np.testing.assert_array_equal(model.final_logits_bias, ref.final_logits_bias)
    batch = ids_with_new_tokens(size)
    np.testing.assert_allclose(torch_logits(model, batch), torch_logits(ref, batch), atol=1e-3)


def test_torch_causal_lm_and_saved_file_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    arch = "BlenderbotForCausalLM"
    weights = random_weights(make_config(), arch)
    ref = hf_model(make_config(), weights, arch)
    model = torch_model(make_config(), weights, BlenderbotForCausalLM)
    ref.resize_token_embeddings(140)
    model.resize_token_embeddings(140)
    ids = torch.tensor([[1, 5, 139, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits, ref(ids).logits, atol=1e-3)
    lm = torch_model(make_config(), random_weights(make_config()))
    lm.resize_token_embeddings(131)
    lm.save_pretrained(tmp_path)
    loaded = transformers.BlenderbotForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = ids_with_new_tokens(131)
    np.testing.assert_allclose(torch_logits(loaded, batch), torch_logits(lm, batch), atol=1e-5)


def test_sizes_the_special_ids_do_not_fit_raise():
    model = torch_model(make_config(), random_weights(make_config()))
    with pytest.raises(ConfigError, match="vocab_size"):
        model.resize_token_embeddings(2)
    with pytest.raises(ConfigError, match="new_num_tokens"):
        model.resize_token_embeddings(0)
    assert model.resize_token_embeddings().weight.shape[0] == 128  # no argument: unchanged


@pytest.mark.parametrize("tied", [True, False])
def test_tf_resize_equals_torch(tied):
    pytest.importorskip("tensorflow")
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

    weights = random_weights(make_config(tie_word_embeddings=tied))
    expected = torch_model(make_config(tie_word_embeddings=tied), weights)
    model = TFBlenderbotForConditionalGeneration(make_config(tie_word_embeddings=tied))
    model.load_weights_dict(weights)
    count = len(model.weights)
    expected.resize_token_embeddings(130, pad_to_multiple_of=8)
    emb = model.resize_token_embeddings(130, pad_to_multiple_of=8)
    assert emb.embeddings.shape == (136, 16) and model.config.vocab_size == 136
    assert model.model.encoder.embed_tokens is emb is model.model.decoder.embed_tokens
    assert len(model.weights) == count and not any(128 in w.shape for w in model.weights)  # old ones dropped
    assert model.final_logits_bias.shape == (1, 136)
    batch = ids_with_new_tokens(136)
    np.testing.assert_allclose(model(**batch).logits, torch_logits(expected, batch), atol=1e-5)
    state = model.state_dict()
    for name, value in expected.canonical_state_dict().items():
        np.testing.assert_allclose(state[name], value, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_flax_resize_equals_torch(tied):
    pytest.importorskip("flax")
    import jax.numpy as jnp

    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    weights = random_weights(make_config(tie_word_embeddings=tied))
    expected = torch_model(make_config(tie_word_embeddings=tied), weights)
    config = make_config(tie_word_embeddings=tied)
    params = params_from_tensors({k: jnp.asarray(v) for k, v in weights.items()}, config, LM)
    model = FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)
    expected.resize_token_embeddings(135)
    emb = model.resize_token_embeddings(135)
    assert emb.shape == (135, 16) and model.config.vocab_size == 135
    batch = ids_with_new_tokens(135)
    np.testing.assert_allclose(model(**batch).logits, torch_logits(expected, batch), atol=1e-5)
