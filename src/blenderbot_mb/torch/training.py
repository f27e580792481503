"""Fine-tuning helpers for the PyTorch backend: one optimizer step, and a small loop over (context, reply) pairs.

    >>> from blenderbot_mb.torch import BlenderbotForConditionalGeneration, fine_tune
    >>> losses = fine_tune(model, tokenizer, [("Hi there!", "Hello, how are you?")], epochs=3, lr=1e-3)
"""

from __future__ import annotations

import random

import torch

from ..data import encode_pairs


def train_step(model, batch: dict, optimizer, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step on `batch` (input_ids, attention_mask, labels with -100 for ignored positions)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch, return_dict=True).loss
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def make_batch(tokenizer, pairs, device=None, max_length: int | None = None) -> dict:
    """(context, reply) pairs as tensors: `blenderbot_mb.data.encode_pairs` (the model's input format)."""
    batch = {k: torch.from_numpy(v) for k, v in encode_pairs(tokenizer, pairs, max_length).items()}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def fine_tune(model, tokenizer, pairs, epochs: int = 1, lr: float = 5e-5, batch_size: int = 8,
              weight_decay: float = 0.0, seed: int = 0) -> list[float]:
    """Fine-tune on (context, reply) text pairs with AdamW; returns the loss of every step. Leaves the
    model in eval mode."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    device = model.device
    losses, pairs = [], list(pairs)
    for _ in range(epochs):
        rng.shuffle(pairs)
        for i in range(0, len(pairs), batch_size):
            losses.append(train_step(model, make_batch(tokenizer, pairs[i:i + batch_size], device), optimizer))
    model.eval()
    return losses
