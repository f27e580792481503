"""Property-based fuzzing of what a model folder says about itself: config.json, generation_config.json and the
tokenizer files. Whatever they hold, only the package's own errors (blenderbot_mb.errors) escape, quickly and
without large allocations; whatever is accepted lies within the limits."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from helpers import TINY_CONFIGS

from blenderbot_mb import BlenderbotConfig, GenerationConfig
from blenderbot_mb.errors import BlenderbotError
from blenderbot_mb.tokenizer import BlenderbotTokenizer
from blenderbot_mb.validation import LIMITS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MEMORY_BUDGET = 32 * 2**20
FUZZ = settings(max_examples=50, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats() | st.text(max_size=12) | st.sampled_from(["false", "true", "1", "gelu", "never", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
CONFIG_FIELDS = [*BlenderbotConfig.field_names(), "num_beams", "max_length", "no_repeat_ngram_size", "return_dict"]


def changed(base: dict, fields: list[str]):
    """`base` with a few fields set to arbitrary JSON values (a config that is almost right)."""
    return st.dictionaries(st.sampled_from(fields), json_values, min_size=1, max_size=3).map(
        lambda edits: {**base, **edits})


def within_budget(load):
    """Run `load`: it succeeds or raises a BlenderbotError with a message, and allocates little."""
    tracemalloc.start()
    try:
        return load()
    except BlenderbotError as e:
        assert str(e).strip() and len(str(e)) < 2000
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BUDGET, peak


def write(folder, name, data) -> None:
    text = data if isinstance(data, (str, bytes)) else json.dumps(data)
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=changed({**TINY_CONFIGS["tiny"], "model_type": "blenderbot"}, CONFIG_FIELDS) | json_values)
def test_config_json(tmp_path, data):
    write(tmp_path, "config.json", data)
    config = within_budget(lambda: BlenderbotConfig.from_pretrained(tmp_path))
    if config is not None:
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                     "decoder_ffn_dim", "max_position_embeddings"):
            value = getattr(config, name)
            assert type(value) is int and 0 <= value <= LIMITS[name], name
        assert type(config.scale_embedding) is bool and type(config.use_cache) is bool
        within_budget(lambda: GenerationConfig.from_model_config(config).resolve(config))


GENERATION_BASE = {"max_length": 12, "num_beams": 2, "min_length": 3, "length_penalty": 0.65,
                   "no_repeat_ngram_size": 3, "eos_token_id": 2}


@FUZZ
@given(data=changed(GENERATION_BASE, list(GenerationConfig.field_names())) | json_values,
       call=st.dictionaries(st.sampled_from(list(GenerationConfig.field_names())), scalars, max_size=2))
def test_generation_config_json(tmp_path, data, call):
    model_config = BlenderbotConfig.from_dict(TINY_CONFIGS["tiny"])
    write(tmp_path, "generation_config.json", data)
    gen = within_budget(lambda: GenerationConfig.from_pretrained(tmp_path, model_config))
    if gen is not None:
        assert type(gen.do_sample) is bool
        resolved = within_budget(lambda: gen.resolve(model_config, **call))
        if resolved is not None:
            assert 2 <= resolved.max_length <= model_config.max_position_embeddings
            assert resolved.num_beams <= LIMITS["num_beams"]
            resolved.processor_plan()


@pytest.fixture(scope="module")
def tokenizer_files(tokenizer_folder):
    from pathlib import Path

    return {p.name: p.read_bytes() for p in Path(tokenizer_folder).iterdir()}


TOKENIZER_KEYS = ["model", "pre_tokenizer", "added_tokens", "normalizer", "decoder", "post_processor", "version",
                  "truncation", "padding"]
MODEL_KEYS = ["type", "vocab", "merges", "unk_token", "dropout", "byte_fallback", "ignore_merges"]
CONFIG_KEYS = ["errors", "add_prefix_space", "model_max_length", "clean_up_tokenization_spaces", "padding_side",
               "truncation_side", "bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token"]


@FUZZ
@given(which=st.sampled_from(["tokenizer.json", "tokenizer.json model", "vocab.json", "merges.txt",
                              "tokenizer_config.json", "special_tokens_map.json", "bytes"]),
       edits=st.dictionaries(st.sampled_from(TOKENIZER_KEYS + MODEL_KEYS + CONFIG_KEYS), json_values, min_size=1,
                             max_size=3),
       raw=st.binary(max_size=200))
def test_tokenizer_files(tmp_path, tokenizer_files, which, edits, raw):
    for name, content in tokenizer_files.items():
        write(tmp_path, name, content)
    if which in ("vocab.json", "merges.txt"):  # the slow files are read only without tokenizer.json
        (tmp_path / "tokenizer.json").unlink()
    if which == "bytes":
        write(tmp_path, "tokenizer.json", raw)
    elif which == "merges.txt":
        write(tmp_path, "merges.txt", "#version: 0.2\n" + "\n".join(str(v) for v in edits.values()))
    else:
        name = which.split()[0]
        data = json.loads(tokenizer_files[name])
        target = data["model"] if which.endswith("model") else data
        target.update(edits)
        write(tmp_path, name, data)
    tokenizer = within_budget(lambda: BlenderbotTokenizer.from_pretrained(tmp_path))
    if tokenizer is not None:
        ids = within_budget(lambda: tokenizer("Hello world! <mask> </s>").input_ids)
        if ids is not None:
            within_budget(lambda: tokenizer.decode(ids, skip_special_tokens=True))
