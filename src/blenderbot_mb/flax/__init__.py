"""JAX / Flax backend of blenderbot-mb: `FlaxBlenderbotForConditionalGeneration` and friends.

Importing it needs `jax`, `flax` and `optax` (pip install 'blenderbot-mb[flax]').
"""

from .._backends import require

require("flax")

from .generation import FlaxGenerationMixin  # noqa: E402
from .modeling import (  # noqa: E402
    FlaxBlenderbotAttention,
    FlaxBlenderbotDecoder,
    FlaxBlenderbotDecoderLayer,
    FlaxBlenderbotEncoder,
    FlaxBlenderbotEncoderLayer,
    FlaxBlenderbotForConditionalGeneration,
    FlaxBlenderbotForConditionalGenerationModule,
    FlaxBlenderbotModel,
    FlaxBlenderbotModule,
    FlaxBlenderbotPreTrainedModel,
    cross_entropy_loss,
    shift_tokens_right,
)

__all__ = [
    "FlaxBlenderbotAttention",
    "FlaxBlenderbotDecoder",
    "FlaxBlenderbotDecoderLayer",
    "FlaxBlenderbotEncoder",
    "FlaxBlenderbotEncoderLayer",
    "FlaxBlenderbotForConditionalGeneration",
    "FlaxBlenderbotForConditionalGenerationModule",
    "FlaxBlenderbotModel",
    "FlaxBlenderbotModule",
    "FlaxBlenderbotPreTrainedModel",
    "FlaxGenerationMixin",
    "cross_entropy_loss",
    "shift_tokens_right",
]
