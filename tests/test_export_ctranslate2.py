"""CTranslate2 export: CTranslate2's own scores of a reply equal the PyTorch backend's log-probabilities,
and its greedy and beam replies are the PyTorch backend's (float32); int8 stays close."""

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

ctranslate2 = pytest.importorskip("ctranslate2")
torch = pytest.importorskip("torch")

from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.export import export_model  # noqa: E402
from blenderbot_mb.export.ctranslate2 import CTranslate2Blenderbot  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

SETTINGS = dict(max_length=14, min_length=0, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=0,
                forced_eos_token_id=None)


@pytest.fixture(scope="module", params=["relu"])
def exported(request, tmp_path_factory):
    config = make_config(request.param)
    src = write_checkpoint(tmp_path_factory.mktemp("src"), config, random_weights(config, seed=5))
    dst = str(tmp_path_factory.mktemp("out") / "ct2")
    export_model(src, dst, to="ctranslate2")
    return config, dst, BlenderbotForConditionalGeneration.from_pretrained(src)


def batch(config, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, (3, 10))
    ids[:, -1] = config.eos_token_id
    mask = np.ones_like(ids)
    ids[1, 6], ids[1, 7:], mask[1, 7:] = config.eos_token_id, config.pad_token_id, 0
    return ids, mask


def torch_log_probs(model, ids, mask, targets):
    """log p(targets[t] | targets[:t], source) per position, from the PyTorch backend."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       decoder_input_ids=torch.from_numpy(targets[:, :-1])).logits
    logp = torch.log_softmax(logits, -1).numpy()
    return np.take_along_axis(logp, targets[:, 1:, None], -1)[..., 0]


@pytest.mark.parametrize("variant, atol", [("float32", 1e-4), ("int8", 0.15)])
def test_scores_match_pytorch(exported, variant, atol):
    config, dst, model = exported
    ids, mask = batch(config)
    targets = np.random.default_rng(1).integers(4, config.vocab_size, (3, 8))
    targets[:, 0] = config.decoder_start_token_id
    bot = CTranslate2Blenderbot.from_pretrained(dst, variant=variant)
    source = [[bot.tokens[t] for t, m in zip(r, ms, strict=True) if m] for r, ms in zip(ids, mask, strict=True)]
    target = [[bot.tokens[t] for t in r[1:]] for r in targets]
    scores = bot.translator.score_batch(source, target)
    ref = torch_log_probs(model, ids, mask, targets)
    for row, got in zip(ref, scores, strict=True):  # CTranslate2 scores the end token too: drop it
        np.testing.assert_allclose(got.log_probs[:-1], row, atol=atol, rtol=0)


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_replies_match_pytorch(exported, ngram):
    config, dst, model = exported
    ids, mask = batch(config, seed=2)
    settings = {**SETTINGS, "forced_eos_token_id": config.eos_token_id, "no_repeat_ngram_size": ngram}
    ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), num_beams=1,
                         **settings).numpy()
    got = CTranslate2Blenderbot.from_pretrained(dst).generate(ids, mask, num_beams=1, **settings)
    for r, g in zip(ref, got, strict=True):  # ours pads after eos to the batch's length
        if ngram and config.decoder_start_token_id in r[1:]:
            continue  # CTranslate2's n-gram blocking does not count the start token (docs/export.md)
        assert list(r[:len(g)]) == g and all(t == config.pad_token_id for t in r[len(g):])


def test_beam_search_runs(exported):
    """CTranslate2's beam search is its own (length normalization, stopping rule): replies may differ from
    ours, so this checks only their form."""
    config, dst, _ = exported
    ids, mask = batch(config, seed=2)
    for reply in CTranslate2Blenderbot.from_pretrained(dst).generate(ids, mask, num_beams=3, **SETTINGS):
        assert reply[0] == config.decoder_start_token_id and 2 <= len(reply) <= SETTINGS["max_length"]
        assert all(0 <= t < config.vocab_size for t in reply)


def test_what_ctranslate2_cannot_do(exported):
    config, dst, _ = exported
    ids, mask = batch(config)
    bot = CTranslate2Blenderbot.from_pretrained(dst)
    with pytest.raises(InputError, match="encoder-side n-gram"):
        bot.generate(ids, mask, **{**SETTINGS, "encoder_no_repeat_ngram_size": 3})
    with pytest.raises(InputError, match="no CTranslate2 'int4' model"):
        CTranslate2Blenderbot.from_pretrained(dst, variant="int4")
