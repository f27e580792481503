"""Errors raised by blenderbot-mb. Every check of user input raises one of these, with a message that
names what is wrong, before any framework sees the data."""

from __future__ import annotations


class BlenderbotError(Exception):
    """Base class of every error this package raises on purpose."""

    # Keras rewrites an error raised inside a layer's call() into a many-line message listing the call's
    # arguments, unless it carries this mark; ours already say what is wrong, the same in every backend.
    _keras_call_info_injected = True


class ConfigError(BlenderbotError, ValueError):
    """A configuration (config.json, generation settings) is malformed or inconsistent."""


class CheckpointError(BlenderbotError, ValueError):
    """A weight file is missing, truncated, or does not match the configuration."""


class InputError(BlenderbotError, ValueError):
    """Model inputs are out of range (too long, ids outside the vocabulary, bad shapes)."""


class TrainingError(BlenderbotError, RuntimeError):
    """A training run cannot go on (its loss diverged to inf or nan)."""


class MissingBackendError(BlenderbotError, ImportError):
    """A framework backend was requested but its framework is not installed."""


def check_input_ids_range(max_id: int, min_id: int, vocab_size: int, what: str = "input_ids") -> None:
    """Raise InputError unless every id lies in [0, vocab_size). Backends pass the max/min they computed."""
    if min_id < 0 or max_id >= vocab_size:
        raise InputError(
            f"{what} holds token id {max_id if max_id >= vocab_size else min_id}, outside the model's "
            f"vocabulary [0, {vocab_size}). Was the text tokenized with another model's tokenizer?"
        )


def check_sequence_length(length: int, max_positions: int, what: str = "input_ids") -> None:
    """Raise InputError when a sequence is longer than the learned position table."""
    if length > max_positions:
        raise InputError(
            f"{what} has length {length}, but the model has only {max_positions} position embeddings "
            f"(config.max_position_embeddings). Truncate the input, e.g. tokenizer(..., truncation=True), "
            f"or build conversations with blenderbot_mb.conversation, which keeps the newest turns."
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a training run: `message` says where it stopped and how to go on, or is empty
    on the processes of a multi-process run other than rank 0 (rank 0 says it once for all)."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message
