"""single_row_layout: the same weights stored [in, out] give the float32 eager path's logits and tokens."""

import pytest

torch = pytest.importorskip("torch")

from test_torch_quantization import EOS, PLAIN, eager_greedy, load, tiny  # noqa: E402

from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.torch import quantize_int8  # noqa: E402
from blenderbot_mb.torch.cpu_layout import single_row_layout  # noqa: E402


@pytest.fixture(scope="module")
def models():
    config, weights, batch = tiny("tiny", eos_bias=2.0)
    return load(config, weights), single_row_layout(load(config, weights)), batch


def test_same_weights_other_storage(models):
    plain, fast, _ = models
    assert fast.lm_head.weight is fast.model.shared.weight  # still tied
    fc1 = fast.model.decoder.layers[0].fc1.weight
    assert fc1.shape == plain.model.decoder.layers[0].fc1.weight.shape and fc1.t().is_contiguous()
    got, want = fast.state_dict(), plain.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_logits_and_tokens_equal_float32_eager(models):
    plain, fast, batch = models
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)
        greedy = fast.generate(ids, attention_mask=mask, max_length=14, **PLAIN)
        assert greedy.tolist() == eager_greedy(plain, ids, mask, max_length=14).tolist()
        assert 0 < (greedy == EOS).any(1).sum() < len(greedy)
        beam = dict(max_length=14, num_beams=4, **{**PLAIN, "no_repeat_ngram_size": 2})
        assert fast.generate(ids, attention_mask=mask, **beam).tolist() == plain.generate(
            ids, attention_mask=mask, **beam).tolist()


def test_refuses_int8_layers(models):
    plain, _, _ = models
    import copy

    with pytest.raises(InputError, match="CPU"):
        single_row_layout(quantize_int8(copy.deepcopy(plain)))
