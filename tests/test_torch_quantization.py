"""int8 CPU decoding (`quantize_int8`): how far it moves the logits from float32 and how often the tokens
agree, against an oracle of what 8-bit rounding costs; its generate() equals its own eager loop and
transformers' model quantized the same way; the CLI option."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import hf_model, make_config, random_batch, random_weights  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from blenderbot_mb.cli import app  # noqa: E402
from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration, quantize_int8  # noqa: E402

EOS, PAD = 2, 0
PLAIN = dict(no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, forced_eos_token_id=None, min_length=0)


def load(config, weights):
    model = BlenderbotForConditionalGeneration(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    return model


def fake_quantized(model, levels: int = 127):
    """The int8 scheme in float32 arithmetic, the oracle for how much 8-bit rounding moves the logits: each
    Linear weight rounded to 255 symmetric levels per output channel, each Linear input rounded per call to
    `levels` steps between min(x, 0) and max(x, 0) (PyTorch's x86 kernels keep activations to 7 bits)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            scale = w.abs().amax(1, keepdim=True) / 127.5
            module.weight = torch.nn.Parameter(torch.clamp(torch.round(w / scale), -128, 127) * scale)
            module.register_forward_pre_hook(lambda _, args: (_round_activations(args[0], levels),))
    return model


def _round_activations(x, levels: int):
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    step = (high - low) / levels
    zero = round(-low / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, levels) - zero) * step


def tiny(name: str, eos_bias: float = 0.0, **overrides):
    """A tiny config, random weights (`eos_bias` added to EOS's logit: replies of different lengths) and a
    padded batch."""
    config = make_config(name, **overrides)
    weights = random_weights(config, seed=5)
    weights["final_logits_bias"][0, EOS] += eos_bias
    batch = {k: torch.from_numpy(v) for k, v in random_batch(config, batch=4, src_len=12, tgt_len=10).items()}
    return config, weights, batch


@pytest.fixture(scope="module")
def wide():
    return tiny("tiny", d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)


@pytest.fixture(scope="module")
def ending():
    return tiny("tiny", eos_bias=2.0)


def test_agreement_with_float32(wide):
    """Teacher-forced logits: the max error stays within 1.5x what the rounding oracle loses (the kernels
    round a little differently from the oracle, not by much more), and every position whose float32 top-1
    margin exceeds twice that bound keeps its token, so the token match rate is at least their share."""
    config, weights, batch = wide
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = batch["labels"] != -100
    with torch.no_grad():
        fp32 = load(config, weights)(**inputs).logits[valid]
        int8 = quantize_int8(load(config, weights))(**inputs).logits[valid]
        oracle = fake_quantized(load(config, weights))(**inputs).logits[valid]
    bound = 1.5 * (oracle - fp32).abs().max().item()
    error = (int8 - fp32).abs().max().item()
    top2 = fp32.topk(2, dim=-1).values
    safe = (top2[:, 0] - top2[:, 1]) > 2 * bound
    same = fp32.argmax(-1) == int8.argmax(-1)
    print(f"int8 vs float32: max logit error {error:.3f} (bound {bound:.3f}, logit spread "
          f"{(fp32.max() - fp32.min()).item():.1f}), token match {same.float().mean().item():.2f} "
          f"(at least {safe.float().mean().item():.2f})")
    assert 0 < error <= bound
    assert same[safe].all()
    assert same.float().mean() >= safe.float().mean()


def eager_greedy(model, input_ids, attention_mask, max_length: int) -> torch.Tensor:
    """Greedy decoding with the public forward and its concatenated cache; finished rows are fed padding, as
    generate() does (int8 activations are rounded per call, so every call must see the same rows)."""
    encoder = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    ids = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    past = None
    while ids.shape[1] < max_length and not done.all():
        out = model(attention_mask=attention_mask, decoder_input_ids=ids[:, -1:], encoder_outputs=encoder,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1).masked_fill(done, PAD)
        done |= token == EOS
        ids = torch.cat([ids, token[:, None]], 1)
    return ids


def test_generate_equals_eager_loop(ending):
    config, weights, batch = ending
    model = quantize_int8(load(config, weights))
    with torch.no_grad():
        got = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_length=14, **PLAIN)
        want = eager_greedy(model, batch["input_ids"], batch["attention_mask"], max_length=14)
    assert 0 < (want == EOS).any(1).sum() < len(want)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("beams", [1, 4])
def test_tokens_equal_transformers_quantized(ending, beams):
    """transformers' model quantized by the same function runs the same int8 arithmetic and its own search."""
    config, weights, batch = ending
    settings = dict(max_length=14, num_beams=beams, **{**PLAIN, "no_repeat_ngram_size": 2})
    ours = quantize_int8(load(config, weights))
    theirs = quantize_int8(hf_model(config, weights))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, **settings)
        want = theirs.generate(ids, attention_mask=mask, **settings)
    want = torch.where(torch.cumsum(want[:, 1:] == EOS, 1) > (want[:, 1:] == EOS).long(), PAD, want[:, 1:])
    assert got[:, 1:].tolist() == want.tolist()


def test_refuses_what_it_cannot_quantize(ending):
    config, weights, _ = ending
    with pytest.raises(InputError, match="float32"):
        quantize_int8(load(config, weights).to(torch.bfloat16))


def test_cli_int8_replies_and_refuses_other_backends(tmp_path_factory):
    """`--quantize int8` on the default model gives the reply of `quantize_int8(model).generate` (token
    agreement with fp32 is measured by the tests above), and is refused, in one line, where it does not apply."""
    from test_cli import default_model_folder

    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer

    runner = CliRunner()
    model = default_model_folder(tmp_path_factory)
    tokenizer = BlenderbotTokenizer.from_pretrained(model)
    ids = build_conversation_ids(tokenizer, ["Do you have any pets?"], max_length=128)
    with torch.no_grad():
        out = quantize_int8(BlenderbotForConditionalGeneration.from_pretrained(model)).generate(torch.tensor([ids]))
    args = ["generate", "Do", "you", "have", "any", "pets?", "--model", model]
    int8 = runner.invoke(app, [*args, "--quantize", "int8"])
    assert int8.exit_code == 0, int8.output
    assert int8.stdout == tokenizer.decode(out[0], skip_special_tokens=True).strip() + "\n"
    refused = runner.invoke(app, [*args, "--quantize", "int8", "--backend", "flax"])
    assert refused.exit_code == 2 and "--quantize int8 is for the torch backend" in refused.output
    assert np.asarray(refused.output.strip().splitlines()).size == 1


def test_serve_loads_int8_and_refuses_it_with_another_dtype():
    from test_cli import default_model_folder

    from blenderbot_mb.serve.server import load_engine

    engine = load_engine(default_model_folder(), "torch", quantize="int8")
    assert isinstance(engine.bot.model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(InputError, match="--quantize int8 starts from float32"):
        load_engine(default_model_folder(), "torch", dtype="bfloat16", quantize="int8")
