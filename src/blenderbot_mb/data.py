"""Training data in the model's own format, once for every backend.

Dialogue files hold one exchange per line, `context<TAB>reply`. `encode_pairs` turns (context, reply)
pairs into padded numpy arrays: the context is built as a conversation (a string is one user turn; a list
is turns, oldest first), exactly as `chat`/`generate` build inputs, so a fine-tuned model sees at training
time what it will see when replying; the reply becomes the labels with a leading space, as the published
models generate it (their first reply token carries the space marker), closed by `</s>`. Backends wrap the
arrays in their own tensors.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from .conversation import build_conversation_ids


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(context, reply) pairs of `context<TAB>reply` lines; lines without both parts are skipped."""
    pairs = []
    for line in text.splitlines():
        context, tab, reply = line.partition("\t")
        if tab and context.strip() and reply.strip():
            pairs.append((context.strip(), reply.strip()))
    return pairs


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(context, reply) pairs of a tab-separated dialogue file."""
    with open(path, encoding="utf-8") as f:
        return parse_pairs(f.read())


def corpus_pairs() -> list[tuple[str, str]]:
    """The package's small dialogue corpus (data/dialogues.txt), used by the default model and the examples."""
    return parse_pairs(resources.files("blenderbot_mb").joinpath("data/dialogues.txt").read_text(encoding="utf-8"))


def encode_pairs(tokenizer, pairs, max_length: int | None = None, width: int | None = None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and labels (int64 arrays, right-padded; label padding is -100).

    `max_length` caps both sides (contexts keep their newest tokens, replies their first); `width` pads
    every row to that many columns (a fixed shape, so a jitted step compiles once) instead of the longest.
    """
    limit = max_length or tokenizer.model_max_length
    inputs, labels = [], []
    for context, reply in pairs:
        turns = [context] if isinstance(context, str) else list(context)
        inputs.append(build_conversation_ids(tokenizer, turns, max_length=limit))
        ids = tokenizer(" " + reply, add_prefix_space=False)["input_ids"]
        labels.append(ids if len(ids) <= limit else ids[: limit - 1] + [tokenizer.eos_token_id])
    cols = width or max(len(r) for r in inputs + labels)
    if max(len(r) for r in inputs + labels) > cols:
        raise ValueError(f"a context or reply is longer than width={cols}; raise width or lower max_length")

    def pad(rows, value):
        return np.array([list(r) + [value] * (cols - len(r)) for r in rows], dtype=np.int64)

    input_ids = pad(inputs, tokenizer.pad_token_id)
    attention_mask = pad([[1] * len(r) for r in inputs], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": pad(labels, -100)}
