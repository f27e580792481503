"""Fine-tuning helpers for the Flax backend: optax optimizer, a train state, and one pure train step that
runs under `jax.jit` (one device), `jax.pmap` (data parallel, gradients averaged with `lax.pmean`) and
`jax.jit` over a `Mesh` with `NamedSharding` (data parallel, the current multi-device path).

    >>> from blenderbot_mb.flax import training
    >>> state = training.create_train_state(model, learning_rate=1e-3)
    >>> step = jax.jit(training.make_train_step(model))
    >>> state, metrics = step(state, training.make_batch(tokenizer, pairs))

The loss is the token mean over the whole (global) batch: labels -100 are ignored (the one rule of
`blenderbot_mb.training`). With pmap
each device's gradient is scaled by its share of the global token count before `lax.pmean`, so a pmap
step over N devices and a jit step over the same global batch give the same update.
"""

from __future__ import annotations

import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..data import encode_pairs
from ..training import IGNORE_INDEX
from .modeling import cross_entropy_loss, shift_tokens_right


class TrainState(train_state.TrainState):
    """params + optimizer state + step, and the dropout key (split every step)."""

    dropout_rng: jax.Array = None


def _decay_mask(params):
    """Weight decay on matrices and embeddings; not on biases, LayerNorm scales or final_logits_bias."""
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in ("bias", "scale", "final_logits_bias")

    return jax.tree_util.tree_map_with_path(keep, params)


def create_optimizer(learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                     total_steps: int | None = None, schedule: str = "linear", max_grad_norm: float | None = 1.0,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with linear warmup then `schedule` ("constant", "linear" to 0, "cosine"), and grad clipping.

    final_logits_bias is frozen (a buffer in the reference's PyTorch model).
    """
    if schedule == "constant" or total_steps is None:
        decay = optax.constant_schedule(learning_rate)
        rest = None
    elif schedule == "linear":
        rest = max(total_steps - warmup_steps, 1)
        decay = optax.linear_schedule(learning_rate, 0.0, rest)
    elif schedule == "cosine":
        rest = max(total_steps - warmup_steps, 1)
        decay = optax.cosine_decay_schedule(learning_rate, rest)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")
    lr = decay
    if warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    tx = optax.chain(*parts, adamw)

    def label(params):
        return {k: ("frozen" if k == "final_logits_bias" else "train") for k in params}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


def create_train_state(model, optimizer: optax.GradientTransformation | None = None, params=None, seed: int = 0,
                       **optimizer_kwargs) -> TrainState:
    """A TrainState over `model`'s params (float32 master weights; compute runs in model.dtype)."""
    tx = optimizer or create_optimizer(**optimizer_kwargs)
    return TrainState.create(apply_fn=model.module.apply, params=model.params if params is None else params, tx=tx,
                             dropout_rng=jax.random.PRNGKey(seed))


def loss_sum_and_count(model, params, batch, dropout_rng=None, train: bool = True, label_smoothing: float = 0.0):
    """(sum of token losses, number of counted tokens) for one batch (-100 labels ignored)."""
    labels = batch["labels"]
    c = model.config
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        decoder_input_ids = shift_tokens_right(labels, c.pad_token_id, c.decoder_start_token_id)
    logits = model(batch["input_ids"], batch.get("attention_mask"), decoder_input_ids,
                   batch.get("decoder_attention_mask"), params=params, dropout_rng=dropout_rng, train=train).logits
    count = jnp.sum(labels != IGNORE_INDEX)
    mean = cross_entropy_loss(logits, labels, label_smoothing=label_smoothing)
    return mean * count, count


def make_train_step(model, label_smoothing: float = 0.0, axis_name: str | None = None):
    """A pure `step(state, batch) -> (state, metrics)`; wrap it in jax.jit, or jax.pmap with `axis_name`."""

    def step(state: TrainState, batch: dict[str, Any]):
        dropout_rng, next_rng = jax.random.split(state.dropout_rng)
        if axis_name is not None:  # each device drops out differently
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
        count = jnp.sum(batch["labels"] != IGNORE_INDEX)
        total = count if axis_name is None else jax.lax.psum(count, axis_name)
        devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)

        def loss_fn(params):
            loss_sum, _ = loss_sum_and_count(model, params, batch, dropout_rng, True, label_smoothing)
            # this device's share of the global mean, times the device count (pmean divides it back)
            return loss_sum * devices / jnp.maximum(total, 1)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        state = state.apply_gradients(grads=grads, dropout_rng=next_rng)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": total}

    return step


def make_eval_step(model, axis_name: str | None = None):
    """`eval_step(params, batch) -> mean token loss` (no dropout)."""

    def step(params, batch):
        loss_sum, count = loss_sum_and_count(model, params, batch, train=False)
        if axis_name is not None:
            loss_sum, count = jax.lax.psum(loss_sum, axis_name), jax.lax.psum(count, axis_name)
        return loss_sum / jnp.maximum(count, 1)

    return step


# ---------------------------------------------------------------------- multi-device helpers
def replicate(tree, devices=None):
    """Copy a pytree onto every local device (leading device axis), for pmap."""
    devices = devices or jax.local_devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    n = len(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + jnp.shape(x)), sharding), tree)


def unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_batch(batch: dict, num_devices: int | None = None) -> dict:
    """[global_batch, ...] -> [devices, global_batch / devices, ...], for pmap."""
    n = num_devices or jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by {n} devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def data_parallel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over the given (default: all) devices."""
    return Mesh(np.array(devices or jax.devices()), ("data",))


def place_on_mesh(state, batch, mesh: Mesh):
    """Replicate the state and split the batch along 'data' (NamedSharding); jit the step over the results."""
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    batch = {k: jax.device_put(np.asarray(v), split) for k, v in batch.items()}
    return state, batch


# ---------------------------------------------------------------------- data and a small loop
def make_batch(tokenizer, pairs, max_length: int | None = None, width: int | None = None) -> dict[str, np.ndarray]:
    """(context, reply) pairs as numpy arrays: `blenderbot_mb.data.encode_pairs` (the model's input format);
    `width` pads to a fixed number of columns, so a jitted step compiles once."""
    return encode_pairs(tokenizer, pairs, max_length, width)


def fine_tune(model, tokenizer, pairs, epochs: int = 1, lr: float = 5e-5, batch_size: int = 8,
              weight_decay: float = 0.0, seed: int = 0, label_smoothing: float = 0.0) -> list[float]:
    """Fine-tune on (context, reply) text pairs with AdamW under jax.jit; updates model.params and returns
    the loss of every step. Batches are padded to a fixed length, so the step compiles once."""
    rng = random.Random(seed)
    pairs = list(pairs)
    steps = epochs * ((len(pairs) + batch_size - 1) // batch_size)
    state = create_train_state(model, learning_rate=lr, weight_decay=weight_decay, total_steps=steps, seed=seed)
    step = jax.jit(make_train_step(model, label_smoothing))
    limit = model.config.max_position_embeddings
    width = make_batch(tokenizer, pairs, limit)["input_ids"].shape[1]  # one shape for every batch
    losses = []
    for _ in range(epochs):
        rng.shuffle(pairs)
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - real)  # a fixed batch shape; the fillers count for nothing
            batch = make_batch(tokenizer, chunk, limit, width)
            batch["labels"][real:] = -100
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    model.params = state.params
    return losses
