"""TF SavedModel export: loaded with `tf.saved_model.load` in a fresh process (no blenderbot_mb imported), its
serving signature gives the TF backend's and the PyTorch backend's beam-search replies, n-gram blocking on
both sides included, at another batch size than it was traced with."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import check_info_and_refusal, make_config, random_weights, write_checkpoint

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

from blenderbot_mb.export import export_model  # noqa: E402

GENERATION = {"num_beams": 3, "max_length": 12, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2,
              "min_length": 4, "forced_eos_token_id": 2, "length_penalty": 0.65}
LOAD = """
import json, sys
import numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = {}
for name, (ids, mask) in json.loads(sys.argv[2]).items():
    seqs = serve(input_ids=tf.constant(ids, tf.int32), attention_mask=tf.constant(mask, tf.int32))["sequences"]
    out[name] = seqs.numpy().tolist()
print(json.dumps(out))
"""


def test_savedmodel_in_a_fresh_process(tmp_path):
    config = make_config("odd")
    src = write_checkpoint(tmp_path / "src", config, random_weights(config, seed=5), generation=GENERATION)
    dst = tmp_path / "sm"
    export_model(src, dst, to="savedmodel")
    assert {"1", "config.json", "generation_config.json"} <= set(os.listdir(dst))
    check_info_and_refusal(str(dst), "a SavedModel")
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, (3, 9))
    ids[:, -1] = config.eos_token_id
    mask = np.ones_like(ids)
    ids[1, 5], ids[1, 6:], mask[1, 6:] = config.eos_token_id, config.pad_token_id, 0
    batches = {"three": (ids, mask), "one": (ids[:1, :6], mask[:1, :6])}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", LOAD, str(dst / "1"),
                          json.dumps({k: (a.tolist(), m.tolist()) for k, (a, m) in batches.items()})],
                         capture_output=True, text=True, timeout=600, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads(run.stdout.strip().splitlines()[-1])

    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    tf_model = TFBlenderbotForConditionalGeneration.from_pretrained(src)
    pt_model = BlenderbotForConditionalGeneration.from_pretrained(src)
    for name, (a, m) in batches.items():
        got = np.array(served[name])
        assert got.shape == (len(a), GENERATION["max_length"])
        assert len(set(got[0].tolist())) > 4  # a reply, not one token repeated
        ref_tf = tf_model.generate(input_ids=a.astype(np.int32), attention_mask=m.astype(np.int32)).numpy()
        ref_pt = pt_model.generate(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m)).numpy()
        for ref in (ref_tf, ref_pt):  # eager replies stop at the longest one; the signature pads to max_length
            np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
            assert (got[:, ref.shape[1]:] == config.pad_token_id).all()


def test_a_sampling_savedmodel_draws_per_row_and_per_call(tmp_path):
    """Sampling in the signature: rows of one call are separate streams, and calls differ (a fresh seed per
    call), as generate() without a seed; before, XLA read only the low 32 bits of each stream's seed words and
    every row and call got the same reply."""
    config = make_config("tiny")
    src = write_checkpoint(tmp_path / "src", config, random_weights(config, seed=1))  # (greedy, beams: its own)
    dst = tmp_path / "sm"
    sampling = {"do_sample": True, "temperature": 1.5, "num_beams": 1, "max_length": 10, "top_k": 0}
    export_model(src, dst, to="savedmodel", generation=sampling)
    from blenderbot_mb.generation_config import GenerationConfig

    written = GenerationConfig.from_pretrained(dst)  # the settings of the graph, not the source's
    assert {k: getattr(written, k) for k in sampling} == sampling
    serve = tf.saved_model.load(str(dst / "1")).signatures["serving_default"]
    ids = tf.constant([[5, 6, 7, 2]] * 4, tf.int32)
    calls = [serve(input_ids=ids, attention_mask=tf.ones_like(ids))["sequences"].numpy() for _ in range(3)]
    rows = [tuple(r) for c in calls for r in c.tolist()]
    assert len(set(rows)) >= 10, rows  # 12 replies of 9 tokens over 128 ids: equal ones would be a shared stream
    # ids the model has no row for, or more tokens than positions: the call fails, as the other runtimes do
    for bad, words in (([[5, 6, config.vocab_size, 2]], "below the vocabulary size"), ([[5, -1, 7, 2]], ">= 0"),
                       ([[5] * (config.max_position_embeddings + 1)], "at most")):
        bad = tf.constant(bad, tf.int32)
        with pytest.raises(tf.errors.InvalidArgumentError, match=words):
            serve(input_ids=bad, attention_mask=tf.ones_like(bad))


def test_tf_sampling_rows_under_xla_are_separate_streams():
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

    config = make_config("tiny")
    model = TFBlenderbotForConditionalGeneration(config)
    ids = tf.constant([[5, 6, 7, 2]] * 4, tf.int32)
    kw = dict(do_sample=True, temperature=1.5, max_new_tokens=8, num_beams=1, top_k=0)
    for seed in (0, 2**40, 2**40 + 1):  # seeds differing above bit 32 too
        compiled = tf.function(lambda i, s=seed: model.generate(input_ids=i, seed=s, **kw), jit_compile=True)
        rows = {tuple(r) for r in compiled(ids).numpy().tolist()}
        assert len(rows) == 4, (seed, rows)
    a, b = (tf.function(lambda i, s=s: model.generate(input_ids=i, seed=s, **kw), jit_compile=True)(ids).numpy()
            for s in (2**40, 2**41))
    assert not np.array_equal(a, b)  # the high words of the seed count under XLA
