"""The PyTorch backend of blenderbot-mb: `from blenderbot_mb.torch import BlenderbotForConditionalGeneration`."""

from .._backends import require

require("torch")

from .generation import GenerationMixin, TorchOps  # noqa: E402
from .modeling import (  # noqa: E402
    BlenderbotAttention,
    BlenderbotDecoder,
    BlenderbotDecoderLayer,
    BlenderbotEncoder,
    BlenderbotEncoderLayer,
    BlenderbotForCausalLM,
    BlenderbotForConditionalGeneration,
    BlenderbotModel,
    BlenderbotPreTrainedModel,
    KVCache,
    shift_tokens_right,
)
from .quantization import quantize_int8  # noqa: E402
from .training import fine_tune, train_step  # noqa: E402

__all__ = [
    "BlenderbotAttention",
    "BlenderbotEncoderLayer",
    "BlenderbotDecoderLayer",
    "BlenderbotEncoder",
    "BlenderbotDecoder",
    "BlenderbotPreTrainedModel",
    "BlenderbotModel",
    "BlenderbotForConditionalGeneration",
    "BlenderbotForCausalLM",
    "GenerationMixin",
    "TorchOps",
    "KVCache",
    "shift_tokens_right",
    "quantize_int8",
    "train_step",
    "fine_tune",
]
