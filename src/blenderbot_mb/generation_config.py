"""Generation settings, shared by the three backends' `generate()`.

Read from `generation_config.json`, or from the legacy generation fields of `config.json` (the published
checkpoints keep num_beams, min_length, ... there). `GenerationConfig.resolve(...)` merges call-time
keyword arguments over the checkpoint's settings, validates them, and turns the user's length settings
into the decoder lengths every backend's loop uses. Backends only do the arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BlenderbotConfig, read_json_settings
from .errors import ConfigError
from .fileio import atomic_write_text
from .validation import check_field_types, check_finite, check_generation_lengths, check_limit, short

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    early_stopping: bool | str = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    renormalize_logits: bool = False
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start_index, decay_factor)
    sequence_bias: list[tuple[list[int], float]] | None = None  # [[ids, bias], ...]; a dict {ids: bias} is read too
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's and vLLM's (not transformers'): see processor_plan
    frequency_penalty: float = 0.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    num_return_sequences: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict_in_generate: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.sequence_bias, dict):  # transformers' older form, {(ids...): bias}
            self.sequence_bias = [[list(ids) if isinstance(ids, (tuple, list)) else ids, bias]
                                  for ids, bias in self.sequence_bias.items()]
        if isinstance(self.exponential_decay_length_penalty, list):  # (as JSON gives it back)
            self.exponential_decay_length_penalty = tuple(self.exponential_decay_length_penalty)
        self.validate()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    # ------------------------------------------------------------------ validation
    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ConfigError naming the first bad setting: strict types, ranges, finite numbers, limits."""
        check_field_types(self, "generation setting")

        def pos_int(name, value, minimum):
            if value < minimum:
                raise ConfigError(f"generation setting {name!r} must be an integer >= {minimum}, got {short(value)}")
            check_limit(name, value, what="generation setting")

        pos_int("max_length", self.max_length, 1)
        pos_int("min_length", self.min_length, 0)
        pos_int("num_beams", self.num_beams, 1)
        pos_int("num_return_sequences", self.num_return_sequences, 1)
        pos_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        pos_int("encoder_no_repeat_ngram_size", self.encoder_no_repeat_ngram_size, 0)
        pos_int("top_k", self.top_k, 0)
        if self.max_new_tokens is not None:
            pos_int("max_new_tokens", self.max_new_tokens, 1)
        if self.min_new_tokens is not None:
            pos_int("min_new_tokens", self.min_new_tokens, 0)
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "presence_penalty",
                     "frequency_penalty", "typical_p", "epsilon_cutoff", "eta_cutoff"):
            check_finite(name, getattr(self, name))
        if self.min_p is not None:
            check_finite("min_p", self.min_p)
        # transformers' ranges (its warpers raise outside them; epsilon and eta 0 are its "off")
        for name, interval, inside in (("min_p", "[0, 1]", lambda v: 0 <= v <= 1),
                                       ("typical_p", "(0, 1]", lambda v: 0 < v <= 1),
                                       ("epsilon_cutoff", "[0, 1)", lambda v: 0 <= v < 1),
                                       ("eta_cutoff", "[0, 1)", lambda v: 0 <= v < 1)):
            value = getattr(self, name)
            if value is not None and not inside(value):
                raise ConfigError(f"generation setting {name!r} must be in {interval}, got {short(value)}")
        for pair in self.sequence_bias or ():
            if not pair[0] or pair[1] != pair[1] or pair[1] == float("inf"):
                raise ConfigError("generation setting 'sequence_bias' must pair non-empty id lists with biases that "
                                  f"are numbers or -inf, got {short(pair)}")
        if self.sequence_bias is not None:
            check_limit("sequence_bias", sum(len(ids) for ids, _ in self.sequence_bias), what="generation setting")
        check_limit("suppress_tokens", len(self.suppress_tokens or ()) + len(self.begin_suppress_tokens or ()),
                    what="generation setting")
        if self.exponential_decay_length_penalty is not None:
            start, factor = self.exponential_decay_length_penalty
            check_finite("exponential_decay_length_penalty", factor)
            if start < 0 or factor <= 0:
                raise ConfigError("generation setting 'exponential_decay_length_penalty' must be (start_index >= 0, "
                                  f"decay_factor > 0), got {short(self.exponential_decay_length_penalty)}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"generation setting 'temperature' must be > 0, got {short(self.temperature)}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"generation setting 'top_p' must be in (0, 1], got {short(self.top_p)}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ConfigError(
                f"generation setting 'repetition_penalty' must be > 0, got {short(self.repetition_penalty)}"
            )
        for name in ("length_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"generation setting {name!r} must be a number, got {short(value)}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(
                f"generation setting 'early_stopping' must be True, False or 'never', got {short(self.early_stopping)}"
            )
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"generation setting 'num_return_sequences' ({self.num_return_sequences}) cannot exceed "
                f"'num_beams' ({self.num_beams}) without sampling"
            )
        if self.bad_words_ids is not None:
            if not (
                isinstance(self.bad_words_ids, (list, tuple))
                and all(
                    isinstance(seq, (list, tuple)) and seq and all(isinstance(t, int) and t >= 0 for t in seq)
                    for seq in self.bad_words_ids
                )
            ):
                raise ConfigError(
                    "generation setting 'bad_words_ids' must be a list of non-empty lists of token ids, "
                    f"got {short(self.bad_words_ids)}"
                )
            check_limit("bad_words_ids", sum(map(len, self.bad_words_ids)), what="generation setting")
        if vocab_size is not None:
            for name in ("forced_bos_token_id", "forced_eos_token_id", "decoder_start_token_id",
                         "bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(self, name)
                ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
                if not all(0 <= i < vocab_size for i in ids):
                    raise ConfigError(
                        f"generation setting {name!r} must be a token id in [0, {vocab_size}), got {short(value)}"
                    )
            for seq in self.bad_words_ids or ():
                if any(t >= vocab_size for t in seq):
                    raise ConfigError(f"generation setting 'bad_words_ids' holds an id >= vocab_size {vocab_size}")
            if any(t >= vocab_size for ids, _ in self.sequence_bias or () for t in ids):
                raise ConfigError(f"generation setting 'sequence_bias' holds an id >= vocab_size {vocab_size}")
            for name in ("suppress_tokens", "begin_suppress_tokens"):
                if any(not 0 <= t < vocab_size for t in getattr(self, name) or ()):
                    raise ConfigError(f"generation setting {name!r} must hold token ids in [0, {vocab_size}), "
                                      f"got {short(getattr(self, name))}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides) -> GenerationConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"generation settings must be a JSON object, got {type(data).__name__}")
        data = {**data, **overrides}
        known = set(cls.field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """Settings from a BlenderbotConfig: its token ids, plus the legacy generation fields of config.json."""
        data = config.to_dict()
        keys = set(cls.field_names()) - {"extra"}
        settings = {k: data[k] for k in keys if k in data and data[k] is not None}
        # a model config's use_cache is an architecture flag; keep it
        return cls.from_dict(settings)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config=None) -> GenerationConfig:
        """generation_config.json if the folder has one, else the legacy fields of its config.json."""
        path = os.path.join(os.fspath(folder), GENERATION_CONFIG_NAME)
        if os.path.isfile(path):
            return read_json_settings(path, cls.from_dict)
        if config is None:
            config = BlenderbotConfig.from_pretrained(folder)
        return cls.from_model_config(config)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names()}
        out.update(self.extra)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the settings that differ from the defaults (what generation_config.json stores)."""
        default = GenerationConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if default.get(k, object()) != v}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(save_directory, GENERATION_CONFIG_NAME), text)

    def update(self, defaults_only: bool = False, **kwargs) -> GenerationConfig:
        """A validated copy with call-time settings applied. Unknown keyword names raise ConfigError.

        `defaults_only=True` (transformers' flag) applies only the settings that are unset (None) here.
        """
        unknown = set(kwargs) - set(self.field_names())
        if unknown:
            raise ConfigError(
                f"unknown generation setting(s): {', '.join(sorted(unknown))}; known: {', '.join(self.field_names())}"
            )
        if defaults_only:
            kwargs = {k: v for k, v in kwargs.items() if getattr(self, k) is None}
        return GenerationConfig.from_dict({**self.to_dict(), **kwargs})

    # transformers' Seq2SeqTrainer(predict_with_generate=True) reads these from model.generation_config;
    # every setting here already has its value, so there are no defaults left to fill in
    _from_model_config = False

    def _get_default_generation_params(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ what the loops need
    def resolve(self, model_config=None, prompt_length: int = 1, **kwargs) -> ResolvedGeneration:
        """Merge kwargs, validate against the model, and compute the decoder lengths of the loop.

        Lengths count decoder tokens including the prompt (for encoder-decoder models the start token), as the
        reference does: max_new_tokens=N means max_length = prompt_length + N.
        """
        kwargs = _drop_trainer_kwargs(kwargs)
        # None means "unset" for plain settings, but is a real value for the optional ones
        # (generate(forced_eos_token_id=None) turns forced eos off, as in the reference)
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        gen = self.update(**{k: v for k, v in kwargs.items() if v is not None or k in optional})
        if model_config is not None:
            filled = {}
            for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(gen, name) is None:
                    filled[name] = getattr(model_config, name)
            if filled:
                gen = gen.update(**filled)
            gen.validate(vocab_size=model_config.vocab_size)
        if gen.decoder_start_token_id is None:
            raise ConfigError("generation needs 'decoder_start_token_id' (set it in the config)")
        max_length = gen.max_length if gen.max_new_tokens is None else prompt_length + gen.max_new_tokens
        # the reference applies min_length and min_new_tokens both; the stricter one wins
        min_length = gen.min_length if gen.min_new_tokens is None else max(gen.min_length,
                                                                           prompt_length + gen.min_new_tokens)
        if model_config is not None and max_length > model_config.max_position_embeddings:
            raise ConfigError(
                f"generation max_length {max_length} exceeds the decoder's {model_config.max_position_embeddings} "
                "position embeddings (config.max_position_embeddings)"
            )
        check_generation_lengths(max_length, min_length)
        if max_length <= prompt_length:
            raise ConfigError(f"generation max_length {max_length} leaves no room after the {prompt_length}-token "
                              "decoder prompt; raise max_length or set max_new_tokens")
        if min_length > max_length:  # the reference's warning, and its rule: the maximum wins
            warnings.warn(f"Unfeasible length constraints: min_length ({min_length}) is larger than the maximum "
                          f"possible length ({max_length}); generation stops at the maximum length. Lower "
                          "min_length (or min_new_tokens) or raise max_length (or max_new_tokens).", UserWarning,
                          stacklevel=3)
        min_length = min(min_length, max_length)
        if gen.exponential_decay_length_penalty is not None:
            _decay_growth(gen, prompt_length, max_length)  # (an overflow is the caller's error, raised here)
        if gen.do_sample:
            mode = "beam_sample" if gen.num_beams > 1 else "sample"
        else:
            mode = "beam_search" if gen.num_beams > 1 else "greedy"
        return ResolvedGeneration(config=gen, max_length=max_length, min_length=min_length, mode=mode,
                                  prompt_length=prompt_length)


def _decay_growth(gen: GenerationConfig, prompt_length: int, max_length: int) -> tuple[float, ...]:
    """exponential_decay_length_penalty's table: per decoder length k, decay_factor ** (k - start) - 1 past
    start = start_index + prompt_length (else 0), float32 as the reference's Python number meets its scores."""
    start, factor = gen.exponential_decay_length_penalty
    start += prompt_length
    with np.errstate(over="ignore"):
        growth = tuple(float(np.float32(np.float64(factor) ** (k - start) - 1)) if k > start else 0.0
                       for k in range(max_length + 1))
    if not np.isfinite(growth[-1]):  # (the reference's Python power raises OverflowError)
        raise ConfigError(f"generation setting 'exponential_decay_length_penalty' "
                          f"{short(gen.exponential_decay_length_penalty)} overflows float32 before max_length "
                          f"{max_length}")
    return growth


# transformers' GenerationConfig.to_dict() keys that are bookkeeping, not settings
_TRANSFORMERS_BOOKKEEPING = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")


def as_generation_config(value) -> GenerationConfig | None:
    """`generation_config=` as this package's GenerationConfig: ours (or None) as it is; a transformers
    `GenerationConfig` (anything with `to_diff_dict`/`to_dict`) converted from the settings it sets. A
    setting this package does not implement (`num_beam_groups=2`, `penalty_alpha`, ...) raises ConfigError
    naming it, rather than being ignored."""
    if value is None or isinstance(value, GenerationConfig):
        return value
    to_dict = getattr(value, "to_diff_dict", None) or getattr(value, "to_dict", None)
    if not callable(to_dict):
        raise ConfigError(f"generation_config must be a GenerationConfig (ours or transformers'), "
                          f"got {type(value).__name__}")
    data = {k: v for k, v in to_dict().items() if k not in _TRANSFORMERS_BOOKKEEPING and v is not None}
    unknown = sorted(set(data) - set(GenerationConfig.field_names()))
    if unknown:
        raise ConfigError(f"generation_config sets {', '.join(f'{k}={data[k]!r}' for k in unknown)}, which "
                          "this package's generate() does not implement")
    return GenerationConfig.from_dict(data)


class GenerationConfigAttribute:
    """A model's `generation_config` attribute (the settings `generate()` starts from), shared by the three
    backends: what is assigned goes through `as_generation_config`, so a transformers GenerationConfig works
    there too (transformers' Seq2SeqTrainer assigns one)."""

    def __get__(self, model, owner=None):
        if model is None:
            return self
        try:
            return model.__dict__["_generation_config"]
        except KeyError:
            raise AttributeError(f"{type(model).__name__} has no generation_config") from None

    def __set__(self, model, value) -> None:
        model.__dict__["_generation_config"] = as_generation_config(value)


def _drop_trainer_kwargs(kwargs: dict) -> dict:
    """What transformers' Seq2SeqTrainer passes to generate() besides settings: `synced_gpus` (generation
    runs on one device here, so only False) and the batch's `labels` (not used by generation)."""
    if kwargs.get("synced_gpus"):
        raise ConfigError("synced_gpus=True is not supported: generate() runs on one device")
    return {k: v for k, v in kwargs.items() if k not in ("synced_gpus", "labels")}


@dataclass(frozen=True)
class ResolvedGeneration:
    """What a backend's generate loop needs: the merged settings and the decoder lengths."""

    config: GenerationConfig
    max_length: int  # total decoder length, start token included
    min_length: int  # eos is banned while the decoder length is below this
    mode: str  # "greedy" | "sample" | "beam_search" | "beam_sample"
    prompt_length: int = 1  # decoder prompt tokens (the start token): the reply begins after them

    def __getattr__(self, name):  # settings read through: resolved.num_beams, resolved.eos_token_id...
        return getattr(self.config, name)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """eos_token_id as a tuple of ids (empty when unset)."""
        eos = self.config.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)

    def processor_plan(self) -> tuple[ProcessorSpec, ...]:
        """The logits processors these settings ask for, in the reference's order, every parameter decided.

        Settings that change nothing (repetition_penalty 1.0, top_k 0, top_p 1.0, temperature 1.0, bad words
        that are only eos) add no processor. Backends map each `name` to their implementation and call it
        with `*params`:

            sequence_bias           (((ids, bias), ...),)  first, as the reference's; one pair per distinct ids
            repetition_penalty      (penalty,)
            presence_frequency      (presence, frequency, prompt_length)   the reply's tokens only
            no_repeat_ngram         (n,)
            encoder_no_repeat_ngram (n,)                  the backend supplies the encoder input ids
            bad_words               (words,)              tuple of token-id tuples, eos-only words dropped
            min_length              (min_length, eos_token_ids)
            forced_bos              (token_id, at_length)  at_length 1
            forced_eos              (token_id, at_length)  at_length max_length - 1
            exponential_decay_length_penalty (growth, eos_token_ids)   growth[cur_len]: the eos scores' factor
            temperature             (temperature,)         sampling only, from here on
            top_k                   (k,)                   k already raised to min_tokens_to_keep
            top_p                   (p, min_tokens_to_keep)
            min_p, typical_p, epsilon_cutoff, eta_cutoff   (value, min_tokens_to_keep)
            renormalize_logits      ()                    last, sampling or not

        suppress_tokens (ids, None) and begin_suppress_tokens (ids, at_length) come before the sampling ones. A
        caller's logits_processor runs before temperature (`logits_process.with_callers`), as in the reference.

        min_tokens_to_keep is 1, or for beam sampling one more than the number of eos ids (at least 2), so
        every beam keeps a continuation that is not eos.
        """
        eos = self.eos_token_ids
        plan = []
        if self.sequence_bias:
            biases = {tuple(int(t) for t in ids): float(bias) for ids, bias in self.sequence_bias}  # (last one wins)
            plan.append(ProcessorSpec("sequence_bias", (tuple(biases.items()),)))
        if self.repetition_penalty != 1.0:
            plan.append(ProcessorSpec("repetition_penalty", (float(self.repetition_penalty),)))
        if self.presence_penalty != 0 or self.frequency_penalty != 0:
            plan.append(ProcessorSpec("presence_frequency", (float(self.presence_penalty),
                                                             float(self.frequency_penalty), self.prompt_length)))
        if self.no_repeat_ngram_size > 0:
            plan.append(ProcessorSpec("no_repeat_ngram", (self.no_repeat_ngram_size,)))
        if self.encoder_no_repeat_ngram_size > 0:
            plan.append(ProcessorSpec("encoder_no_repeat_ngram", (self.encoder_no_repeat_ngram_size,)))
        words = tuple(tuple(int(t) for t in w) for w in self.bad_words_ids or () if list(w) not in [[e] for e in eos])
        if words:
            plan.append(ProcessorSpec("bad_words", (words,)))
        if self.min_length > 0 and eos:
            plan.append(ProcessorSpec("min_length", (self.min_length, eos)))
        if self.forced_bos_token_id is not None:
            plan.append(ProcessorSpec("forced_bos", (self.forced_bos_token_id, 1)))
        if self.forced_eos_token_id is not None:
            plan.append(ProcessorSpec("forced_eos", (self.forced_eos_token_id, self.max_length - 1)))
        if self.exponential_decay_length_penalty is not None and eos:
            plan.append(ProcessorSpec("exponential_decay_length_penalty",
                                      (_decay_growth(self.config, self.prompt_length, self.max_length), eos)))
        if self.suppress_tokens:
            plan.append(ProcessorSpec("suppress_tokens", (tuple(int(t) for t in self.suppress_tokens), None)))
        if self.begin_suppress_tokens:
            # the first reply token, one later when forced_bos fills it after a lone start token (the reference)
            first = self.prompt_length + (self.prompt_length == 1 and self.forced_bos_token_id is not None)
            plan.append(ProcessorSpec("begin_suppress_tokens", (tuple(int(t) for t in self.begin_suppress_tokens),
                                                                first)))
        if self.do_sample:
            keep = max(2, len(eos) + 1) if self.num_beams > 1 else 1
            if self.temperature != 1.0:
                plan.append(ProcessorSpec("temperature", (float(self.temperature),)))
            if self.top_k:
                plan.append(ProcessorSpec("top_k", (max(int(self.top_k), keep),)))
            if self.top_p < 1.0:
                plan.append(ProcessorSpec("top_p", (float(self.top_p), keep)))
            if self.min_p is not None:
                plan.append(ProcessorSpec("min_p", (float(self.min_p), keep)))
            if self.typical_p < 1.0:
                plan.append(ProcessorSpec("typical_p", (float(self.typical_p), keep)))
            if self.epsilon_cutoff > 0:
                plan.append(ProcessorSpec("epsilon_cutoff", (float(self.epsilon_cutoff), keep)))
            if self.eta_cutoff > 0:
                plan.append(ProcessorSpec("eta_cutoff", (float(self.eta_cutoff), keep)))
        if self.renormalize_logits:
            plan.append(ProcessorSpec("renormalize_logits"))
        return tuple(plan)


@dataclass(frozen=True)
class ProcessorSpec:
    """One logits processor of a plan: its name and positional parameters (hashable, for jit cache keys)."""

    name: str
    params: tuple = ()
