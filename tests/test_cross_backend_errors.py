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


# name: keyword arguments given as Python lists (every backend reads them itself, before its framework does)
LISTS = {
    "ragged ids": dict(input_ids=[[5, 6, 7], [5, 6]], decoder_input_ids=[[1, 5], [1, 5]]),
    "ragged decoder ids": dict(input_ids=[[5, 6, 7], [5, 6, 7]], decoder_input_ids=[[1, 5], [1]]),
    "ragged mask": dict(input_ids=[[5, 6, 7], [5, 6, 7]], attention_mask=[[1, 1, 1], [1, 1]],
                        decoder_input_ids=[[1, 5], [1, 5]]),
    "ragged labels": dict(input_ids=[[5, 6, 7], [5, 6, 7]], labels=[[5, 2], [2]]),
    "ids that are not numbers": dict(input_ids=[["a", 5]], decoder_input_ids=[[1, 5]]),
    "float ids in a list": dict(input_ids=[[5, 6.5]], decoder_input_ids=[[1, 5]]),
    "float64 ids": dict(input_ids=np.array([[5.0, 6.0]]), decoder_input_ids=[[1, 5]]),  # (Keras casts to float32)
    "float64 labels": dict(input_ids=[[5, 6]], labels=np.array([[5.0, 2.0]])),
}


@pytest.mark.parametrize("case", sorted(LISTS))
def test_python_lists(models, case):
    """Nested lists: rows of different lengths name the argument and the lengths, in every backend (TF and
    Flax gave their frameworks' errors), and generate() gives the same error as the forward pass."""
    kwargs = LISTS[case]
    errors = {backend: _error(lambda b=backend: models[b](**kwargs)) for backend in models}
    _same(errors)
    if case.startswith("ragged"):
        name = case.split()[1]
        argument = {"ids": "input_ids", "decoder": "decoder_input_ids", "mask": "attention_mask"}.get(name, name)
        lengths = [len(row) for row in kwargs[argument]]
        assert f"{argument} has rows of different lengths ({lengths[0]}, {lengths[1]})" in errors["torch"][1]
    if case == "ragged ids":
        _same({**errors, **{backend: _error(lambda b=backend: models[b].generate(kwargs["input_ids"]))
                            for backend in models}})


def test_ids_as_a_positional_list(models):
    """model([[ids]], decoder_input_ids=[[...]]): the same logits in every backend (Keras refused a positional
    Python list)."""
    logits = {b: models[b]([[5, 6, 7, 2]], decoder_input_ids=[[1, 5]]).logits for b in models}
    logits["torch"] = logits["torch"].detach().numpy()
    np.testing.assert_allclose(logits["tf"], logits["torch"], atol=1e-5)
    np.testing.assert_allclose(logits["flax"], logits["torch"], atol=1e-5)


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


LABELS = np.array([[5, 6, 2]], np.int64)
# name: (decoder_input_ids, labels)
LABEL_CASES = {
    "labels outside the vocabulary": (None, LABELS + 1000),
    "labels outside the vocabulary, decoder ids given": (DEC, np.array([[5, 1000]])),
    "negative labels other than -100": (DEC, np.array([[5, -5]])),
    "labels of the wrong length": (DEC, LABELS),
    "float labels": (DEC, np.array([[5.0, 6.0]], np.float32)),
    "labels longer than the positions": (None, np.full((1, 200), 5)),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_labels(models, case):
    """Targets are checked as ids are: in the vocabulary or -100, one per decoder position (PyTorch's
    cross-entropy would fail inside torch, TensorFlow's inside Keras, and JAX would return nan or ignore them)."""
    dec, labels = LABEL_CASES[case]

    def forward(backend):
        model, t = models[backend], (lambda x: _tensor(backend, x))
        if backend == "flax":
            return lambda: model(IDS, attention_mask=ONES, decoder_input_ids=dec, labels=labels)
        return lambda: model(input_ids=t(IDS), attention_mask=t(ONES), decoder_input_ids=t(dec), labels=t(labels))

    errors = {backend: _error(forward(backend)) for backend in models}
    _same(errors)
    assert errors["torch"][0] == "InputError"
    if case == "labels longer than the positions":  # named as the caller gave them
        assert errors["torch"][1].startswith("labels (the decoder reads them, shifted) has length 200"), errors


def test_decoder_rows_must_match_the_encoder_rows(models):
    ids, dec = np.repeat(IDS, 3, axis=0), np.repeat(DEC, 2, axis=0)
    errors = {backend: _error(lambda b=backend: models[b](ids, decoder_input_ids=dec) if b == "flax" else
                              models[b](input_ids=_tensor(b, ids), decoder_input_ids=_tensor(b, dec)))
              for backend in models}
    _same(errors)
    assert "decoder inputs have 2 rows and the encoder's 3" in errors["torch"][1]


def test_loss_tuples_and_inputs_agree(models):
    """The loss comes first in a tuple (return_dict=False) in every backend; a batch whose labels are all -100
    has a nan loss (a mean over no token, as PyTorch's cross-entropy); numpy ids and lists work everywhere."""
    labels = np.array([[5, 2]], np.int64)
    out = {"flax": models["flax"](IDS, attention_mask=ONES, labels=labels, return_dict=False),
           "tf": models["tf"](input_ids=IDS, attention_mask=ONES, labels=labels, return_dict=False),
           "torch": models["torch"](input_ids=IDS, attention_mask=ONES.tolist(), labels=labels, return_dict=False)}
    for backend, values in out.items():
        loss, logits = (np.asarray(v.detach() if backend == "torch" else v) for v in values[:2])
        assert loss.shape == () and logits.shape == (1, 2, models[backend].config.vocab_size), backend
        # the loss, recomputed here with numpy from the logits
        logp = logits[0] - np.log(np.exp(logits[0] - logits[0].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits[0].max(-1, keepdims=True)
        np.testing.assert_allclose(loss, -logp[[0, 1], labels[0]].mean(), rtol=1e-5)
    ignored = np.full_like(labels, -100)
    losses = {"flax": models["flax"](IDS, decoder_input_ids=DEC, labels=ignored).loss,
              "tf": models["tf"](input_ids=IDS, decoder_input_ids=DEC, labels=ignored).loss,
              "torch": models["torch"](input_ids=IDS, decoder_input_ids=DEC, labels=ignored).loss}
    assert all(math.isnan(float(v)) for v in losses.values()), losses


@pytest.mark.parametrize("dtype", ["bogus", "auto", "int32", None])
def test_flax_dtypes_are_checked_at_load(folder, dtype):
    from blenderbot_mb.errors import ConfigError

    if dtype is None:  # float32, as PyTorch's None
        assert FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=None).dtype == np.float32
        return
    with pytest.raises(ConfigError, match="must be a floating dtype"):
        FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    with pytest.raises(ConfigError, match="param_dtype must be a floating dtype"):
        FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, param_dtype=dtype)


def test_tf_dtypes_are_checked_at_load(folder):
    """A Keras policy name, or a dtype as TensorFlow or NumPy spells it; anything not floating is a ConfigError."""
    from blenderbot_mb.errors import ConfigError

    for dtype, policy in (("bfloat16", "bfloat16"), (tf.float16, "float16"), (np.float16, "float16"),
                          ("mixed_bfloat16", "mixed_bfloat16"), (None, "float32")):
        assert TFBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=dtype).dtype_policy.name == policy
    for dtype, why in (("int32", "must be floating"), (tf.int32, "must be floating"), ("bogus", "not a Keras dtype"),
                       ("auto", "not a Keras dtype")):
        with pytest.raises(ConfigError, match=why):
            TFBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=dtype)


class Refused(Exception):
    """A caller's own error, raised in a hook."""


def test_a_hooks_error_is_the_callers_in_every_backend(models):
    """A stopping criterion that answers no bool is an InputError naming what it returned; an exception a
    streamer raises reaches the caller as itself (JAX had wrapped it in its runtime error), in every backend."""
    errors = {b: _error(lambda b=b: models[b].generate(_tensor(b, IDS), max_new_tokens=3,
                                                       stopping_criteria=[lambda ids, scores: "yes"]))
              for b in models}
    _same(errors)
    assert errors["torch"][0] == "InputError" and "returned 'yes'" in errors["torch"][1]

    class Streamer:
        def put(self, ids):
            raise Refused("no more")

        def end(self):
            pass

    for backend, model in models.items():
        with pytest.raises(Refused, match="no more"):
            model.generate(_tensor(backend, IDS), max_new_tokens=3, streamer=Streamer())


def test_encoder_outputs_in_every_form(models):
    """encoder_outputs= as a BaseModelOutput, a tuple or the hidden states alone give the same logits (Flax:
    decode()); anything else is an InputError with the same message."""
    from blenderbot_mb.outputs import BaseModelOutput

    logits = {}
    for backend, model in models.items():
        def t(x, b=backend):
            return _tensor(b, x)

        if backend == "flax":
            hidden = model.encode(IDS).last_hidden_state
            forms = [BaseModelOutput(last_hidden_state=hidden), (hidden,), hidden]
            logits[backend] = [np.asarray(model.decode(DEC, form).logits) for form in forms]
            bad = (lambda m=model: m.decode(DEC, "hidden"))  # noqa: E731
        else:
            hidden = model.get_encoder()(t(IDS)).last_hidden_state
            forms = [BaseModelOutput(last_hidden_state=hidden), (hidden,), hidden]
            outs = [model(encoder_outputs=form, decoder_input_ids=t(DEC)).logits for form in forms]
            logits[backend] = [(x.detach() if backend == "torch" else x).numpy() for x in outs]
            bad = (lambda m=model, t=t: m(encoder_outputs="hidden", decoder_input_ids=t(DEC)))  # noqa: E731
        logits[backend + " error"] = _error(bad)
    _same({b: v for b, v in logits.items() if b.endswith("error")})
    for backend in models:
        for got in logits[backend]:
            np.testing.assert_allclose(got, logits["torch"][0], atol=1e-5, err_msg=backend)


def test_generate_takes_inputs_as_the_reference_names_it(models):
    """generate(inputs=...) is generate(input_ids=...); neither, or both, is the same InputError everywhere."""
    for backend, model in models.items():
        by_name = model.generate(inputs=_tensor(backend, IDS), max_new_tokens=3)
        plain = model.generate(_tensor(backend, IDS), max_new_tokens=3)
        np.testing.assert_array_equal(np.asarray(getattr(by_name, "sequences", by_name)),
                                      np.asarray(getattr(plain, "sequences", plain)), err_msg=backend)
    _same({b: _error(lambda b=b: models[b].generate(max_new_tokens=3)) for b in models})
    _same({b: _error(lambda b=b: models[b].generate(_tensor(b, IDS), inputs=_tensor(b, IDS), max_new_tokens=3))
           for b in models})
