"""ORTBlenderbotForConditionalGeneration: the ONNX export on onnxruntime with the core search gives the
PyTorch backend's logits and tokens (greedy, beam search with n-gram blocking, min length, several
returned sequences) and refuses what the PyTorch backend refuses."""

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from blenderbot_mb.errors import BlenderbotError  # noqa: E402
from blenderbot_mb.export import export_model  # noqa: E402
from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = make_config("odd")
    src = write_checkpoint(tmp_path_factory.mktemp("src"), config, random_weights(config, seed=5))
    dst = str(tmp_path_factory.mktemp("out") / "onnx")
    export_model(src, dst, to="onnx")
    return config, ORTBlenderbotForConditionalGeneration.from_pretrained(dst), \
        BlenderbotForConditionalGeneration.from_pretrained(src)


def batch(config):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, (3, 9))
    ids[:, -1] = config.eos_token_id
    mask = np.ones_like(ids)
    ids[1, 5], ids[1, 6:], mask[1, 6:] = config.eos_token_id, config.pad_token_id, 0
    return ids, mask


def test_logits(models):
    config, ort, pt = models
    ids, mask = batch(config)
    dec = np.random.default_rng(1).integers(4, config.vocab_size, (3, 5))
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    np.testing.assert_allclose(ort(ids, mask, decoder_input_ids=dec), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [
    dict(num_beams=1),
    dict(num_beams=1, no_repeat_ngram_size=2, min_length=6, forced_eos_token_id=2),
    dict(num_beams=3, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=2, length_penalty=0.65,
         num_return_sequences=2),
])
def test_generate_matches_pytorch(models, settings):
    config, ort, pt = models
    ids, mask = batch(config)
    settings = {"max_length": 12, **settings}
    want = pt.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings).numpy()
    got = ort.generate(ids, mask, **settings)
    np.testing.assert_array_equal(got, want)
    if settings.get("no_repeat_ngram_size"):
        assert len(set(got[0].tolist())) > 4  # replies, not one token repeated


def test_sampling_is_repeatable(models):
    config, ort, _ = models
    ids, mask = batch(config)
    a = ort.generate(ids, mask, do_sample=True, top_k=20, seed=3, max_length=10)
    assert (a == ort.generate(ids, mask, do_sample=True, top_k=20, seed=3, max_length=10)).all()
    assert (a[:, 0] == config.decoder_start_token_id).all()


def test_refuses_like_pytorch(models):
    config, ort, _ = models
    with pytest.raises(BlenderbotError, match="vocabulary"):
        ort.generate([[5, config.vocab_size + 7, 2]], max_length=5)
    with pytest.raises(BlenderbotError):
        ort.generate([[5, 6, 2]], num_beams=2, num_return_sequences=3)
