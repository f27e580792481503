"""TensorFlow / Keras 3 backend of blenderbot-mb (`pip install 'blenderbot-mb[tf]'`).

Runs on Keras 3 with the TensorFlow backend: set `KERAS_BACKEND=tensorflow` (done here when unset).
"""

import os

from .._backends import require

require("tf")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from .generation import TFGenerationMixin  # noqa: E402
from .modeling import (  # noqa: E402
    TFBlenderbotAttention,
    TFBlenderbotDecoder,
    TFBlenderbotDecoderLayer,
    TFBlenderbotEncoder,
    TFBlenderbotEncoderLayer,
    TFBlenderbotForConditionalGeneration,
    TFBlenderbotMainLayer,
    TFBlenderbotModel,
    TFBlenderbotPreTrainedModel,
    shift_tokens_right,
)
from .training import CheckpointCallback, make_dataset  # noqa: E402

__all__ = [
    "TFBlenderbotAttention", "TFBlenderbotEncoderLayer", "TFBlenderbotDecoderLayer", "TFBlenderbotEncoder",
    "TFBlenderbotDecoder", "TFBlenderbotMainLayer", "TFBlenderbotPreTrainedModel", "TFBlenderbotModel",
    "TFBlenderbotForConditionalGeneration", "TFGenerationMixin", "shift_tokens_right", "CheckpointCallback",
    "make_dataset",
]
