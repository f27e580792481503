"""TensorFlow SavedModel export: the TF backend's XLA-compiled `generate` as a serving signature.

    saved = tf.saved_model.load("bb-savedmodel")
    out = saved.signatures["serving_default"](input_ids=ids, attention_mask=mask)   # int32 [batch, src]
    out["sequences"]                                                                # int32 [batch, max_length]

The whole search (greedy, sampling or beam search, n-gram blocking on both sides, min length, forced
eos) runs inside the graph, compiled with XLA, with the generation settings of the model folder (or
`generation` overrides, written to the export's generation_config.json) fixed at export time. Replies start
with the decoder start token and are padded with pad_token_id to `max_length`. Input ids outside the
vocabulary, or longer than the model's positions, fail the call (InvalidArgumentError naming the rule), as
the other runtimes refuse them, instead of XLA's clamped lookups. TF Serving can serve the folder's `1/`
version directory as it is.
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
            config = self.model.config
            checks = [  # outside XLA, which would clamp an id past the tables instead of failing
                tf.debugging.assert_non_negative(input_ids, message="input ids must be >= 0"),
                tf.debugging.assert_less(input_ids, config.vocab_size,
                                         message=f"input ids must be below the vocabulary size {config.vocab_size}"),
                tf.debugging.assert_less_equal(
                    tf.shape(input_ids)[1], config.max_position_embeddings,
                    message=f"inputs hold at most {config.max_position_embeddings} tokens (the model's positions)"),
                tf.debugging.assert_equal(tf.shape(attention_mask), tf.shape(input_ids),
                                          message="attention_mask must have the shape of input_ids")]
            with tf.control_dependencies(checks):
                # a fresh seed per call, outside XLA (a stateful op): sampled replies differ between calls and
                # between the rows of a call (each row its own stream), as generate() without a seed does
                seed = tf.random.uniform([], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64)
                return {"sequences": self.search(tf.identity(input_ids), tf.identity(attention_mask), seed)}

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
    save_configs(src, dst, generation=generation or {})  # the settings the graph was built with
    return [VERSION_DIR]
