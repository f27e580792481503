"""PyTorch models against transformers' PyTorch classes (the oracle) on the same random weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import TINY_CONFIGS, hf_model, make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.naming import tensor_names, tied_aliases  # noqa: E402
from blenderbot_mb.torch import (  # noqa: E402
    BlenderbotForCausalLM,
    BlenderbotForConditionalGeneration,
    BlenderbotModel,
    shift_tokens_right,
)

CLASSES = {
    "BlenderbotModel": BlenderbotModel,
    "BlenderbotForConditionalGeneration": BlenderbotForConditionalGeneration,
    "BlenderbotForCausalLM": BlenderbotForCausalLM,
}
ATOL = 1e-5


def ours(config, weights, arch="BlenderbotForConditionalGeneration"):
    model = CLASSES[arch](config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= set(tied_aliases(config, arch))
    return model


def tensors(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def close(a, b, atol=ATOL):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol, rtol=0)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def setup(request):
    config = make_config(request.param)
    weights = random_weights(config, seed=3)
    return config, weights, tensors(random_batch(config, batch=3, src_len=9, tgt_len=7))


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_state_dict_names_are_the_reference_names(arch):
    config = make_config("odd")
    names = set(CLASSES[arch](config).state_dict())
    assert names == set(tensor_names(config, arch)) | set(tied_aliases(config, arch))


def test_seq2seq_lm_logits_loss_and_encoder_match_transformers(setup):
    config, weights, b = setup
    model, ref = ours(config, weights), hf_model(config, weights)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out, exp = model(**kw), ref(**kw)
    assert exp.logits.abs().max() > 0.1  # a non-trivial comparison
    close(out.logits, exp.logits)
    close(out.loss, exp.loss)
    close(out.encoder_last_hidden_state, exp.encoder_last_hidden_state)


def test_decoder_attention_mask_and_explicit_decoder_ids_match(setup):
    config, weights, b = setup
    model, ref = ours(config, weights), hf_model(config, weights)
    dec_mask = torch.ones_like(b["decoder_input_ids"])
    dec_mask[1, 5:] = 0
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              decoder_input_ids=b["decoder_input_ids"], decoder_attention_mask=dec_mask)
    close(model(**kw).logits, ref(**kw).logits)


def test_base_model_matches_transformers(setup):
    config, weights, b = setup
    w = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    model, ref = ours(config, w, "BlenderbotModel"), hf_model(config, w, "BlenderbotModel")
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"])
    out, exp = model(**kw), ref(**kw)
    close(out.last_hidden_state, exp.last_hidden_state)
    close(out.encoder_last_hidden_state, exp.encoder_last_hidden_state)


@pytest.mark.parametrize("cross", [False, True])
def test_causal_lm_matches_transformers(setup, cross):
    config, weights, b = setup
    w = random_weights(config, "BlenderbotForCausalLM", seed=4)
    model, ref = ours(config, w, "BlenderbotForCausalLM"), hf_model(config, w, "BlenderbotForCausalLM")
    labels = b["labels"]
    kw = dict(input_ids=b["decoder_input_ids"], labels=labels, use_cache=False)  # transformers 5 sizes its
    # causal-LM cache by encoder_layers, which breaks when decoder_layers differ
    if cross:
        enc = torch.randn(3, 5, config.d_model, generator=torch.Generator().manual_seed(0))
        kw.update(encoder_hidden_states=enc, encoder_attention_mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5]))
    out, exp = model(**kw), ref(**kw)
    close(out.logits, exp.logits)
    close(out.loss, exp.loss)


def test_hidden_states_and_attentions_match_transformers(setup):
    config, weights, b = setup
    model = ours(config, weights)
    ref = hf_model(config, weights)
    ref.config._attn_implementation = "eager"  # the reference returns attention weights only from eager attention
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"],
              output_hidden_states=True, output_attentions=True)
    out, exp = model(**kw), ref(**kw)
    for name in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions", "decoder_attentions",
                 "cross_attentions"):
        got, want = getattr(out, name), getattr(exp, name)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            close(g, w)
    close(out.logits, exp.logits)


def test_cached_step_by_step_decoding_equals_full_forward(setup):
    config, weights, b = setup
    model = ours(config, weights)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    full = model(**kw, decoder_input_ids=b["decoder_input_ids"]).logits
    enc = model.get_encoder()(**kw)
    past, steps = None, []
    ids = b["decoder_input_ids"]
    for t in range(ids.shape[1]):
        out = model(attention_mask=b["attention_mask"], encoder_outputs=enc, decoder_input_ids=ids[:, t:t + 1],
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert len(past) == config.decoder_layers and len(past[0]) == 4
    assert past[0][0].shape == (3, config.decoder_attention_heads, ids.shape[1], config.d_model // config.decoder_attention_heads)
    close(torch.cat(steps, 1), full)
    # two tokens at once after a cached prefix
    out = model(attention_mask=b["attention_mask"], encoder_outputs=enc, decoder_input_ids=ids[:, :4], use_cache=True)
    rest = model(attention_mask=b["attention_mask"], encoder_outputs=enc, decoder_input_ids=ids[:, 4:],
                 past_key_values=out.past_key_values)
    close(rest.logits, full[:, 4:])


def test_shift_tokens_right():
    labels = torch.tensor([[5, 6, 2], [7, -100, -100]])
    assert shift_tokens_right(labels, 0, 1).tolist() == [[1, 5, 6], [1, 7, 0]]


def test_labels_alone_build_decoder_inputs(setup):
    config, weights, b = setup
    model = ours(config, weights)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    a = model(**kw, labels=b["labels"])
    c = model(**kw, decoder_input_ids=b["decoder_input_ids"])
    close(a.logits, c.logits)
    logits, labels = c.logits.reshape(-1, config.vocab_size), b["labels"].reshape(-1)
    keep = labels != -100
    expected = -torch.log_softmax(logits[keep].double(), -1).gather(1, labels[keep][:, None]).mean()
    close(a.loss.double(), expected)


def test_return_dict_false_gives_tuples(setup):
    config, weights, b = setup
    model = ours(config, weights)
    out = model(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"], return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (3, 7, config.vocab_size)


def test_head_mask_ones_is_identity_and_zero_changes_output(setup):
    config, weights, b = setup
    model = ours(config, weights)
    kw = dict(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"])
    base = model(**kw).logits
    ones = torch.ones(config.encoder_layers, config.encoder_attention_heads)
    close(model(**kw, head_mask=ones).logits, base)
    assert not torch.allclose(model(**kw, head_mask=torch.zeros_like(ones)).logits, base)


def test_dropout_only_in_train_mode():
    config = make_config("tiny", dropout=0.3, attention_dropout=0.2, activation_dropout=0.2)
    model = ours(config, random_weights(config))
    b = tensors(random_batch(config))
    kw = dict(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"])
    assert torch.equal(model(**kw).logits, model(**kw).logits)
    model.train()
    torch.manual_seed(0)
    a = model(**kw).logits
    assert not torch.allclose(a, model(**kw).logits)
    model.eval()
    close(model(**kw).logits, hf_model(config, random_weights(config))(**kw).logits)


def test_layerdrop_only_in_train_mode():
    config = make_config("tiny", encoder_layerdrop=0.9, decoder_layerdrop=0.9)
    model = ours(config, random_weights(config))
    b = tensors(random_batch(config))
    kw = dict(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"])
    expected = hf_model(config, random_weights(config))(**kw).logits
    close(model(**kw).logits, expected)
    model.train()
    torch.manual_seed(0)
    assert any(not torch.allclose(model(**kw).logits, expected) for _ in range(3))


def test_random_init_like_the_reference():
    config = make_config("relu", init_std=0.05)
    model = BlenderbotForConditionalGeneration(config).requires_grad_(False)
    fc1 = model.model.encoder.layers[0].fc1
    assert abs(float(fc1.weight.std()) - 0.05) < 0.01 and float(fc1.bias.abs().max()) == 0
    assert float(model.model.shared.weight[config.pad_token_id].abs().max()) == 0
    ln = model.model.decoder.layer_norm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and float(ln.bias.abs().max()) == 0
    assert float(model.final_logits_bias.abs().max()) == 0
    assert model.lm_head.weight is model.model.shared.weight
    assert model.model.encoder.embed_tokens is model.model.shared is model.model.decoder.embed_tokens


@pytest.mark.parametrize("activation", ["gelu_new", "silu", "gelu_fast", "tanh"])
def test_other_activations_match_transformers(activation):
    config = make_config("tiny", activation_function=activation)
    weights = random_weights(config)
    b = tensors(random_batch(config))
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"])
    close(ours(config, weights)(**kw).logits, hf_model(config, weights)(**kw).logits)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise_input_error():
    config = make_config("tiny")
    model = ours(config, random_weights(config))
    ok = torch.tensor([[5, 6, 2]])
    too_long = torch.full((1, config.max_position_embeddings + 1), 5)
    with pytest.raises(InputError, match="position embeddings"):
        model(input_ids=too_long, decoder_input_ids=ok)
    with pytest.raises(InputError, match="position embeddings"):
        model(input_ids=ok, decoder_input_ids=too_long)
    with pytest.raises(InputError, match="vocabulary"):
        model(input_ids=torch.tensor([[5, config.vocab_size]]), decoder_input_ids=ok)
    with pytest.raises(InputError, match="vocabulary"):
        model(input_ids=ok, decoder_input_ids=torch.tensor([[-1, 4]]))
    with pytest.raises(InputError, match="attention_mask"):
        model(input_ids=ok, attention_mask=torch.ones(1, 5), decoder_input_ids=ok)
    with pytest.raises(InputError, match="shape"):
        model(input_ids=torch.tensor([5, 6]), decoder_input_ids=ok)
    with pytest.raises(InputError, match="decoder_input_ids"):
        model.model(input_ids=ok)
    # the cached length counts towards the limit
    enc = model.get_encoder()(input_ids=ok)
    out = model(encoder_outputs=enc, decoder_input_ids=torch.full((1, config.max_position_embeddings), 5),
                use_cache=True)
    with pytest.raises(InputError, match="cached"):
        model(encoder_outputs=enc, decoder_input_ids=ok[:, :1], past_key_values=out.past_key_values)
    with pytest.raises(InputError, match="vocabulary"):
        model.generate(torch.tensor([[5, 999]]), max_length=5)


def test_value_checks_left_to_a_caller_that_checked_on_the_host():
    from blenderbot_mb.torch.modeling import check_values

    config = make_config("tiny")
    model = ours(config, random_weights(config))
    ok, bad = torch.tensor([[5, 6, 2]]), torch.tensor([[5, config.vocab_size, 2]])
    check_values(model, False)  # a training loop that checked its batches: forward reads no values
    with pytest.raises(IndexError):  # the embedding lookup fails, not our check
        model(input_ids=bad, decoder_input_ids=ok)
    with pytest.raises(InputError, match="shape"):  # shapes and dtypes are still checked
        model(input_ids=torch.tensor([5, 6]), decoder_input_ids=ok)
    check_values(model, True)
    with pytest.raises(InputError, match="vocabulary"):
        model(input_ids=bad, decoder_input_ids=ok)


@pytest.mark.parametrize("options", [None, {"use_reentrant": True}], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(options):
    """gradient_checkpointing_enable(): each layer runs again in the backward pass (counted), the loss and every
    gradient equal the plain run's (dropout on: the masks are replayed); every_n_layers checkpoints fewer;
    evaluation and disable() run each layer once."""
    config = make_config("tiny", dropout=0.1, attention_dropout=0.1)
    model = BlenderbotForConditionalGeneration(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, seed=7).items()}, strict=False)
    batch = random_batch(config, batch=3, src_len=9)
    labels = torch.randint(3, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    layers = [*model.model.encoder.layers, *model.model.decoder.layers]
    calls = []

    def counted(forward):
        def call(*args, **kwargs):
            calls.append(forward)
            return forward(*args, **kwargs)
        return call

    for layer in layers:  # (the forward method counted: a recomputation runs no module hooks)
        layer.forward = counted(layer.forward)

    def run():
        model.train()
        model.zero_grad()
        calls.clear()
        torch.manual_seed(0)
        out = model(input_ids=torch.from_numpy(batch["input_ids"]),
                    attention_mask=torch.from_numpy(batch["attention_mask"]), labels=labels)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            len(calls)

    loss, grads, count = run()
    assert count == len(layers) and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(options)
    assert model.is_gradient_checkpointing
    again, checked, count = run()
    assert count == 2 * len(layers) and again == loss and checked.keys() == grads.keys()
    for name, value in grads.items():
        torch.testing.assert_close(checked[name], value, atol=1e-6, rtol=1e-5, msg=name)
    model.gradient_checkpointing_enable(options, every_n_layers=2)  # layers 0 of each stack (tiny: 2 + 2)
    assert run()[2] == len(layers) + len(model.model.encoder.layers[::2]) + len(model.model.decoder.layers[::2])
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(input_ids=torch.from_numpy(batch["input_ids"]), labels=labels)
    assert len(calls) == len(layers)
    model.gradient_checkpointing_disable()
    assert run()[2] == len(layers)
    with pytest.raises(InputError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=0)
