"""blenderbot-mb: the BlenderBot chatbot in PyTorch, TensorFlow/Keras 3 and JAX/Flax.

The top-level package holds the framework-free core; importing it imports no framework.
Backends: ``blenderbot_mb.torch``, ``blenderbot_mb.tf``, ``blenderbot_mb.flax``.
"""

from __future__ import annotations

from .config import BlenderbotConfig
from .errors import (
    BlenderbotError,
    CheckpointError,
    ConfigError,
    InputError,
    MissingBackendError,
    TrainingError,
)
from .generation_config import GenerationConfig

__version__ = "0.1.0"

_LAZY = {
    "BlenderbotTokenizer": "tokenizer",
    "BlenderbotTokenizerFast": "tokenizer",
    "train_tokenizer": "tokenizer",
    "build_conversation_ids": "conversation",
    "Conversation": "conversation",
}


def __getattr__(name):  # PEP 562: tokenizer modules load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlenderbotConfig",
    "GenerationConfig",
    "BlenderbotError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "MissingBackendError",
    "TrainingError",
    *_LAZY,
]
