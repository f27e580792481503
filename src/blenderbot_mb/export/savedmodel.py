"""TensorFlow SavedModel export: the TF backend's XLA-compiled `generate` as a serving signature.

    saved = tf.saved_model.load("bb-savedmodel")
    out = saved.signatures["serving_default"](input_ids=ids, attention_mask=mask)   # int32 [batch, src]
    out["sequences"]                                                                # int32 [batch, max_length]

The whole search (greedy, sampling or beam search, n-gram blocking on both sides, min length, forced
eos) runs inside the graph, compiled with XLA, with the generation settings of the model folder (or
`generation` overrides) fixed at export time. Replies start with the decoder start token and are padded
with pad_token_id to `max_length`. TF Serving can serve the folder's `1/` version directory as it is.
"""

from __future__ import annotations

import os

VERSION_DIR = "1"  # TF Serving reads numbered versions below the model's base path


def export_savedmodel(model, path: str | os.PathLike, **generation) -> None:
    """Write `model` (a TFBlenderbotForConditionalGeneration) as a SavedModel at `path` whose
    `serving_default` signature maps input_ids, attention_mask -> sequences (all int32)."""
    import tensorflow as tf

    settings = model.generation_config.update(**generation) if generation else model.generation_config
    spec = tf.TensorSpec([None, None], tf.int32)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # tracked: its variables are saved with the graph

        @tf.function(input_signature=[spec, spec, tf.TensorSpec([], tf.int64)], jit_compile=True)
        def search(self, input_ids, attention_mask, seed):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       generation_config=settings, seed=seed)

        @tf.function(input_signature=[spec, spec])
        def generate(self, input_ids, attention_mask):
            # a fresh seed per call, outside XLA (a stateful op): sampled replies differ between calls and
            # between the rows of a call (each row its own stream), as generate() without a seed does
            seed = tf.random.uniform([], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64)
            return {"sequences": self.search(input_ids, attention_mask, seed)}

    module = Serving()
    tf.saved_model.save(module, os.fspath(path), signatures={"serving_default": module.generate})


def export_folder(src: str, dst: str, allow_pickle: bool = False, generation: dict | None = None) -> list[str]:
    """Export the model folder `src` (TF backend, float32) as `dst/1/` plus config and tokenizer files."""
    from .._backends import require

    require("tf")
    from ..tf import TFBlenderbotForConditionalGeneration
    from . import save_configs

    model = TFBlenderbotForConditionalGeneration.from_pretrained(src, allow_pickle=allow_pickle)
    export_savedmodel(model, os.path.join(dst, VERSION_DIR), **(generation or {}))
    save_configs(src, dst)
    return [VERSION_DIR]
