"""The same bad input gives the same error (class and message) in the three backends.

Every backend calls the one validation of the core (blenderbot_mb.validation) at its entry points:
forward passes, generate and from_pretrained. Tiny models, numpy inputs turned into each framework's
own tensors (Flax takes numpy arrays as they are).
"""

import math

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("jax")

from blenderbot_mb.errors import BlenderbotError  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

CLASSES = {"torch": BlenderbotForConditionalGeneration, "tf": TFBlenderbotForConditionalGeneration,
           "flax": FlaxBlenderbotForConditionalGeneration}
IDS = np.array([[5, 6, 7, 2]], np.int64)
ONES = np.ones_like(IDS)
DEC = np.array([[1, 5]], np.int64)

# name: (input_ids, attention_mask, decoder_input_ids)
FORWARD = {
    "float ids": (IDS.astype(np.float32), ONES, DEC),
    "bool ids": (IDS > 5, ONES, DEC),
    "1-D ids": (IDS[0], None, DEC),
    "3-D ids": (IDS[None], None, DEC),
    "empty ids": (IDS[:, :0], None, DEC),
    "ids outside the vocabulary": (IDS + 1000, ONES, DEC),
    "negative ids": (-IDS, ONES, DEC),
    "ids longer than the positions": (np.full((1, 65), 5), None, DEC),
    "mask of the wrong shape": (IDS, np.ones((1, 5), np.int64), DEC),
    "mask of rank 1": (IDS, ONES[0], DEC),
    "mask holding 2": (IDS, ONES * 2, DEC),
    "float mask holding 0.5": (IDS, (ONES * 0.5).astype(np.float32), DEC),
    "float decoder ids": (IDS, ONES, DEC.astype(np.float32)),
    "decoder ids outside the vocabulary": (IDS, ONES, DEC + 1000),
}
GENERATE = {
    "max_length=1": dict(max_length=1),
    "NaN length penalty": dict(length_penalty=math.nan, num_beams=2),
    "inf temperature": dict(do_sample=True, temperature=math.inf),
    "a million beams": dict(num_beams=1_000_000),
    "huge encoder n-gram": dict(encoder_no_repeat_ngram_size=10**9),
    "max_length beyond the positions": dict(max_length=1000),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = make_config("tiny")
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), config, random_weights(config))


@pytest.fixture(scope="module")
def models(folder):
    return {name: cls.from_pretrained(folder) for name, cls in CLASSES.items()}


def _tensor(backend, x):
    if x is None or backend == "flax":
        return x
    return torch.from_numpy(np.asarray(x)) if backend == "torch" else tf.constant(x)


def _error(call) -> tuple[str, str]:
    with pytest.raises(BlenderbotError) as e:
        call()
    return type(e.value).__name__, str(e.value)


def _same(errors: dict) -> None:
    assert len(set(errors.values())) == 1, errors


@pytest.mark.parametrize("case", sorted(FORWARD))
def test_forward(models, case):
    ids, mask, dec = FORWARD[case]

    def forward(backend):
        model, t = models[backend], (lambda x: _tensor(backend, x))
        if backend == "flax":
            return lambda: model(ids, attention_mask=mask, decoder_input_ids=dec)
        return lambda: model(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec))

    _same({backend: _error(forward(backend)) for backend in models})


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate(models, case):
    settings = GENERATE[case]
    _same({backend: _error(lambda b=backend: models[b].generate(_tensor(b, IDS), attention_mask=_tensor(b, ONES),
                                                                **settings)) for backend in models})


@pytest.mark.parametrize("case", ["float ids", "1-D ids", "mask of the wrong shape", "ids outside the vocabulary"])
def test_generate_inputs(models, case):
    ids, mask, _ = FORWARD[case]
    _same({backend: _error(lambda b=backend: models[b].generate(_tensor(b, ids), attention_mask=_tensor(b, mask),
                                                                max_new_tokens=3)) for backend in models})


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_weights_that_are_not_float(tmp_path, dtype):
    config = make_config("tiny")
    weights = random_weights(config)
    weights["model.encoder.layer_norm.weight"] = weights["model.encoder.layer_norm.weight"].astype(dtype)
    folder = write_checkpoint(tmp_path, config, weights)
    errors = {name: _error(lambda c=cls: c.from_pretrained(folder)) for name, cls in CLASSES.items()}
    _same(errors)
    assert "weights must be floating point" in errors["torch"][1]


def test_ngram_sizes_at_the_limit_are_no_error(models):
    """N-gram sizes up to the limit are valid even when longer than the input or the reply: nothing to ban,
    the same tokens in every backend (a size above the limit is refused, see GENERATE)."""
    settings = dict(max_length=8, num_beams=2, no_repeat_ngram_size=64, encoder_no_repeat_ngram_size=64)
    out = {backend: np.asarray(getattr(o, "sequences", o)) for backend, o in (
        (b, models[b].generate(_tensor(b, IDS), attention_mask=_tensor(b, ONES), **settings)) for b in models)}
    np.testing.assert_array_equal(out["tf"], out["torch"])
    np.testing.assert_array_equal(out["flax"], out["torch"])
