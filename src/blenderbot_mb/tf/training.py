"""Fine-tuning helpers for the TensorFlow backend: Keras `fit` does the loop, these make the data and save
checkpoints in Hugging Face layout while it runs.

    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))       # no loss: the model's masked LM loss
    >>> data = make_dataset(tokenizer, pairs, batch_size=8)          # tf.data of input_ids/attention_mask/labels
    >>> model.fit(data, epochs=3, callbacks=[CheckpointCallback("out/")])
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from ..data import encode_pairs, read_pairs  # noqa: F401  (read_pairs: re-exported for fit users)


def make_batch(tokenizer, pairs, max_length: int | None = None) -> dict:
    """(context, reply) pairs as numpy arrays: `blenderbot_mb.data.encode_pairs` (the model's input format)."""
    return encode_pairs(tokenizer, pairs, max_length)


def make_dataset(tokenizer, pairs, batch_size: int = 8, shuffle: bool = True, seed: int = 0,
                 max_length: int | None = None) -> tf.data.Dataset:
    """A tf.data.Dataset of dict batches for `model.fit`, padded per batch (every batch tokenized up front)."""
    pairs = list(pairs)
    if shuffle:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    batches = [make_batch(tokenizer, pairs[i:i + batch_size], max_length)
               for i in range(0, len(pairs), batch_size)]
    spec = {k: tf.TensorSpec((None, None), tf.int32) for k in ("input_ids", "attention_mask", "labels")}

    def gen():
        for b in batches:
            yield {k: v.astype(np.int32) for k, v in b.items()}

    return tf.data.Dataset.from_generator(gen, output_signature=spec)


class CheckpointCallback(keras.callbacks.Callback):
    """Save the model with `save_pretrained` (HF-layout safetensors + config) during `fit`.

    Every `every_n_epochs` epochs to `folder/checkpoint-epoch-N` (or every `every_n_steps` batches to
    `folder/checkpoint-step-N`); with `keep_last`, older checkpoints are removed. `tokenizer`, if given, is
    saved beside each checkpoint so the folder is a complete model.
    """

    def __init__(self, folder, every_n_epochs: int = 1, every_n_steps: int | None = None,
                 keep_last: int | None = None, tokenizer=None):
        super().__init__()
        self.folder, self.every_n_epochs, self.every_n_steps = os.fspath(folder), every_n_epochs, every_n_steps
        self.keep_last, self.tokenizer = keep_last, tokenizer
        self.saved: list[str] = []
        self._step = 0

    def _save(self, tag: str) -> None:
        path = os.path.join(self.folder, f"checkpoint-{tag}")
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        self.saved.append(path)
        if self.keep_last is not None:
            import shutil

            while len(self.saved) > self.keep_last:
                shutil.rmtree(self.saved.pop(0), ignore_errors=True)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.every_n_steps and self._step % self.every_n_steps == 0:
            self._save(f"step-{self._step}")

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_n_steps and self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._save(f"epoch-{epoch + 1}")
