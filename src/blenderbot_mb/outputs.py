"""Output containers of the reference API (`Seq2SeqLMOutput`, ...), shared by the three backends.

Like the reference's ModelOutput: fields read as attributes (`out.logits`), as keys (`out["logits"]`)
or by position over the fields that are set (`out[0]`); unset (None) fields are left out.
The Flax backend registers these classes as pytrees so they pass through `jax.jit`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any


class ModelOutput(OrderedDict):
    def __post_init__(self):
        names = [f.name for f in fields(self)]
        first = getattr(self, names[0])
        if isinstance(first, Iterator) and all(getattr(self, n) is None for n in names[1:]):
            # built from (name, value) pairs, as TensorFlow's nest rebuilds a mapping (a tf.function's output)
            super().__setattr__(names[0], None)
            for name, value in first:
                if name not in names:
                    raise TypeError(f"{type(self).__name__} has no field {name!r}")
                setattr(self, name, value)
            return
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__ and value is not None:
            self._set_in_order(name, value)

    def __setitem__(self, key, value):
        self._set_in_order(key, value)
        super().__setattr__(key, value)

    def _set_in_order(self, key, value):
        """Set a key; a field set after the others (a loss added to built outputs) takes its field's place, so
        positions (`out[0]`, `to_tuple()`) follow the field order, as the reference's classes do."""
        new = key not in self
        super().__setitem__(key, value)
        if new and key in self.__dataclass_fields__:
            later = False
            for f in fields(self):
                if later and f.name in self:
                    self.move_to_end(f.name)
                later = later or f.name == key

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def __reduce__(self):  # pickling/copy go through the dataclass fields
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))


@dataclass(eq=False)
class BaseModelOutput(ModelOutput):
    last_hidden_state: Any = None
    hidden_states: Any = None
    attentions: Any = None


def as_encoder_outputs(value) -> BaseModelOutput:
    """A model's `encoder_outputs=` argument as a BaseModelOutput: one already (or the reference's, any mapping
    with `last_hidden_state`), a tuple or list whose first item is the last hidden state (then the hidden
    states and attentions), or that [batch, length, d_model] array alone. Anything else is an InputError."""
    from .errors import InputError

    if isinstance(value, BaseModelOutput):
        return value
    if isinstance(value, Mapping) and "last_hidden_state" in value:
        return BaseModelOutput(last_hidden_state=value["last_hidden_state"], hidden_states=value.get("hidden_states"),
                               attentions=value.get("attentions"))
    if isinstance(value, (tuple, list)) and value:
        return BaseModelOutput(*value[:3])
    if len(getattr(value, "shape", ())) == 3:
        return BaseModelOutput(last_hidden_state=value)
    raise InputError("encoder_outputs must be the encoder's output: a BaseModelOutput, a tuple whose first item is "
                     "its last hidden state [batch, length, d_model], or that array; got "
                     + (f"an array of shape {tuple(value.shape)}" if hasattr(value, "shape") else type(value).__name__))


@dataclass(eq=False)
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None
    cross_attentions: Any = None


@dataclass(eq=False)
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    decoder_hidden_states: Any = None
    decoder_attentions: Any = None
    cross_attentions: Any = None
    encoder_last_hidden_state: Any = None
    encoder_hidden_states: Any = None
    encoder_attentions: Any = None


@dataclass(eq=False)
class Seq2SeqLMOutput(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    decoder_hidden_states: Any = None
    decoder_attentions: Any = None
    cross_attentions: Any = None
    encoder_last_hidden_state: Any = None
    encoder_hidden_states: Any = None
    encoder_attentions: Any = None


@dataclass(eq=False)
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None
    cross_attentions: Any = None


@dataclass(eq=False)
class GenerateOutput(ModelOutput):
    """What `generate(..., return_dict_in_generate=True)` returns (Flax: always)."""

    sequences: Any = None
    sequences_scores: Any = None
    scores: Any = None
    logits: Any = None
    beam_indices: Any = None
    encoder_attentions: Any = None
    encoder_hidden_states: Any = None
    decoder_attentions: Any = None
    cross_attentions: Any = None
    decoder_hidden_states: Any = None
