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


def make_batch(tokenizer, pairs, pad_token_id: int = 0, max_length: int | None = None) -> dict:
    """Tokenize (context, reply) pairs: padded encoder inputs, and reply ids as labels (padding -> -100)."""
    contexts, replies = [c for c, _ in pairs], [r for _, r in pairs]
    enc = tokenizer(contexts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    labels = np.asarray(tokenizer(replies, padding=True, truncation=True, max_length=max_length,
                                  return_tensors="np")["input_ids"])
    labels = np.where(labels == pad_token_id, -100, labels)
    return {"input_ids": np.asarray(enc["input_ids"]), "attention_mask": np.asarray(enc["attention_mask"]),
            "labels": labels}


def make_dataset(tokenizer, pairs, batch_size: int = 8, shuffle: bool = True, seed: int = 0,
                 pad_token_id: int = 0, max_length: int | None = None) -> tf.data.Dataset:
    """A tf.data.Dataset of dict batches for `model.fit`, padded per batch (every batch tokenized up front)."""
    pairs = list(pairs)
    if shuffle:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    batches = [make_batch(tokenizer, pairs[i:i + batch_size], pad_token_id, max_length)
               for i in range(0, len(pairs), batch_size)]
    spec = {k: tf.TensorSpec((None, None), tf.int32) for k in ("input_ids", "attention_mask", "labels")}

    def gen():
        for b in batches:
            yield {k: v.astype(np.int32) for k, v in b.items()}

    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(context, reply) pairs of a tab-separated dialogue file (one `user<TAB>bot` pair per line)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 2 and parts[0].strip() and parts[1].strip():
                pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


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
