"""Training on the Flax backend: an optax optimizer, a train state and one pure train step, run three ways.

- `jax.jit` on one device;
- `jax.pmap` with `axis_name` (the reference's training-script style): gradients averaged with `lax.pmean`;
- `Trainer`: `jax.jit` over a `Mesh` with `NamedSharding`, the batch split along 'data', params and optimizer
  state replicated or, with `fsdp=True`, sharded along 'data' too. After `jax.distributed.initialize()` the mesh
  spans every process and host; each process feeds its own rows (`jax.make_array_from_process_local_data`).

    >>> from blenderbot_mb.flax import training
    >>> state = training.create_train_state(model, learning_rate=1e-3)
    >>> step = jax.jit(training.make_train_step(model))
    >>> state, metrics = step(state, training.make_batch(tokenizer, pairs))

The loss is the token mean over the whole (global, accumulated) batch; labels -100 are ignored. Every way of
running the step computes each device's share `loss_sum / global_token_count`, so pmap over N devices, a mesh
over N processes and `grad_accum` micro-batches all make the same update as one device on the same batch.
LoRA (`init_lora`) trains low-rank adapters on the attention (optionally FFN) projections with the base frozen.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct, traverse_util
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import lora
from ..data import encode_pairs
from ..errors import ConfigError
from ..training import IGNORE_INDEX, decays, step_seed
from .modeling import FlaxBlenderbotForConditionalGeneration, cross_entropy_loss, shift_tokens_right


class TrainState(train_state.TrainState):
    """params (what is trained) + optimizer state + step, and the dropout key (split every step).

    With LoRA, `params` are the adapters and `frozen` the base model's params, merged in every forward pass."""

    dropout_rng: jax.Array = None
    frozen: Any = None
    lora_scale: float = struct.field(pytree_node=False, default=0.0)

    def model_params(self):
        """The params the model runs with: the base plus the scaled adapters, or `params` themselves."""
        return self.params if self.frozen is None else merge_lora(self.frozen, self.params, self.lora_scale)


# ---------------------------------------------------------------------- LoRA
def init_lora(params, rank: int, targets=lora.ATTENTION_TARGETS, seed: int = 0) -> dict:
    """Adapters for every Dense kernel named in `targets`: {..path..: {"lora_a": [in, r], "lora_b": [r, out]}}.

    A starts as `blenderbot_mb.lora.initial_a(module, in, rank, seed)` (uniform in +-1/sqrt(in), the same in every
    backend), B is zero: training starts at the base."""
    adapters = {}
    for path, kernel in sorted(traverse_util.flatten_dict(params).items()):
        if path[-1] == "kernel" and path[-2] in targets:
            fan_in, fan_out = kernel.shape
            adapters[path[:-1] + ("lora_a",)] = lora.initial_a(".".join(path[:-1]), fan_in, rank, seed).T
            adapters[path[:-1] + ("lora_b",)] = np.zeros((rank, fan_out), np.float32)
    if not adapters:
        raise ConfigError(f"no Dense kernel named {', '.join(targets)} in the params")
    return traverse_util.unflatten_dict(adapters)


def merge_lora(params, adapters, scale: float):
    """The base params with every adapted kernel replaced by `kernel + scale * lora_a @ lora_b`."""
    flat = dict(traverse_util.flatten_dict(params))
    pieces = traverse_util.flatten_dict(adapters)
    for path, a in pieces.items():
        if path[-1] == "lora_a":
            kernel = path[:-1] + ("kernel",)
            delta = scale * (a @ pieces[path[:-1] + ("lora_b",)])  # [in, r] @ [r, out]
            flat[kernel] = flat[kernel] + delta.astype(flat[kernel].dtype)
    return traverse_util.unflatten_dict(flat)


def lora_tensors(adapters) -> dict[str, np.ndarray]:
    """Adapters in the file names and PyTorch layout of `blenderbot_mb.lora` (A [r, in], B [out, r])."""
    out = {}
    for path, value in traverse_util.flatten_dict(adapters).items():
        if path[-1] == "lora_a":
            key_a, key_b = lora.adapter_keys(".".join(path[:-1]))
            out[key_a] = np.ascontiguousarray(np.asarray(value, np.float32).T)
            b = traverse_util.flatten_dict(adapters)[path[:-1] + ("lora_b",)]
            out[key_b] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    return out


def lora_from_modules(modules: dict) -> dict:
    """{module: (A [r, in], B [out, r])} (as `blenderbot_mb.lora.read_adapters` returns) -> adapters."""
    flat = {}
    for module, (a, b) in modules.items():
        path = tuple(module.split("."))
        flat[path + ("lora_a",)] = np.asarray(a, np.float32).T
        flat[path + ("lora_b",)] = np.asarray(b, np.float32).T
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------- optimizer and state
def _decay_mask(params):
    """Weight decay where `blenderbot_mb.training.decays` says (matrices, embeddings, adapters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays("/".join(str(getattr(k, "key", k)) for k in path)), params)


def create_optimizer(learning_rate: float = 5e-5, weight_decay: float = 0.0, warmup_steps: int = 0,
                     total_steps: int | None = None, schedule: str = "linear", max_grad_norm: float | None = 1.0,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with linear warmup then `schedule` ("constant", "linear" to 0, "cosine"), and grad clipping.

    final_logits_bias is frozen (a buffer in the reference's PyTorch model).
    """
    if schedule == "constant" or total_steps is None:
        decay = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")
    lr = decay
    if warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return frozen_logits_bias(optax.chain(*parts, adamw))


def frozen_logits_bias(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on every param but final_logits_bias, which never moves."""
    def label(params):
        return {k: ("frozen" if k == "final_logits_bias" else "train") for k in params}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


def adamw(weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW at learning rate 1 (the update is multiplied by each step's rate, see `make_update`), after
    clipping the global gradient norm, as `blenderbot_mb.training` states it."""
    from ..training import ADAM_BETAS, ADAM_EPS

    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts += [optax.scale_by_adam(*ADAM_BETAS, eps=ADAM_EPS), optax.add_decayed_weights(weight_decay, _decay_mask),
              optax.scale(-1.0)]
    return frozen_logits_bias(optax.chain(*parts))


def create_train_state(model, optimizer: optax.GradientTransformation | None = None, params=None, seed: int = 0,
                       lora_rank: int = 0, lora_alpha: float | None = None, lora_targets=lora.ATTENTION_TARGETS,
                       adapters=None, **optimizer_kwargs) -> TrainState:
    """A TrainState over `model`'s params (float32 master weights; compute runs in model.dtype).

    With `lora_rank`, the state trains adapters (given, or new ones; scale lora_alpha / lora_rank, alpha
    defaulting to the rank) and keeps the params frozen beside them."""
    tx = optimizer or create_optimizer(**optimizer_kwargs)
    params = model.params if params is None else params
    frozen, scale = None, 0.0
    if lora_rank:
        frozen, params = params, init_lora(params, lora_rank, lora_targets, seed) if adapters is None else adapters
        scale = (lora_alpha or lora_rank) / lora_rank
    return TrainState.create(apply_fn=model.module.apply, params=params, tx=tx, dropout_rng=jax.random.PRNGKey(seed),
                             frozen=frozen, lora_scale=scale)


# ---------------------------------------------------------------------- loss and steps
def loss_sum_and_count(model, params, batch, dropout_rng=None, train: bool = True, label_smoothing: float = 0.0):
    """(sum of token losses, number of counted tokens) for one batch (labels -100 ignored)."""
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


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [grad_accum, B / grad_accum, ...]; row i goes to micro-batch i % grad_accum, so a batch split
    along its rows across devices stays split the same way (no data moves between devices)."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={grad_accum}")
        return jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def accumulated_grads(model, state: TrainState, micro: dict, dropout_rng, label_smoothing: float = 0.0,
                      axis_name: str | None = None):
    """Gradients of sum(token losses) / global token count over micro-batches [accum, B, L] (lax.scan: the
    activation memory of one micro-batch). Returns (loss, grads, global token count); with `axis_name` (pmap)
    each device returns its share times the device count, so `lax.pmean` gives the global values."""
    total = jnp.sum(micro["labels"] != IGNORE_INDEX)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    share = devices / jnp.maximum(total, 1).astype(jnp.float32)

    def grads_of(batch, rng):
        def loss_fn(params):
            full = params if state.frozen is None else merge_lora(state.frozen, params, state.lora_scale)
            loss_sum, _ = loss_sum_and_count(model, full, batch, rng, True, label_smoothing)
            return loss_sum * share

        return jax.value_and_grad(loss_fn)(state.params)

    def accumulate(carry, xs):
        batch, i = xs
        loss, grads = grads_of(batch, jax.random.fold_in(dropout_rng, i))
        return (carry[0] + loss, jax.tree_util.tree_map(jnp.add, carry[1], grads)), None

    accum = micro["labels"].shape[0]
    if accum == 1:
        loss, grads = grads_of({k: v[0] for k, v in micro.items()}, jax.random.fold_in(dropout_rng, 0))
    else:
        zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
    return loss, grads, total


def trained_norm(grads) -> jax.Array:
    """The global L2 norm of the gradients the optimizer clips and applies (final_logits_bias is frozen)."""
    return optax.tree.norm({k: v for k, v in grads.items() if k != "final_logits_bias"})


def make_train_step(model, label_smoothing: float = 0.0, axis_name: str | None = None, grad_accum: int = 1):
    """A pure `step(state, batch) -> (state, metrics)`; wrap it in jax.jit, or jax.pmap with `axis_name`.

    With `grad_accum` > 1 the batch is split into that many micro-batches whose gradients are summed before the
    one optimizer update: the activation memory of one micro-batch, the update of the whole batch."""

    def step(state: TrainState, batch: dict[str, Any]):
        dropout_rng, next_rng = jax.random.split(state.dropout_rng)
        if axis_name is not None:  # each device drops out differently
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
        micro = split_micro_batches(batch, grad_accum)
        loss, grads, total = accumulated_grads(model, state, micro, dropout_rng, label_smoothing, axis_name)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        state = state.apply_gradients(grads=grads, dropout_rng=next_rng)
        return state, {"loss": loss, "grad_norm": trained_norm(grads), "tokens": total}

    return step


def make_update(model, label_smoothing: float = 0.0):
    """`update(state, micro, lr, dropout_rng) -> (state, metrics)`: one optimizer step on micro-batches
    [accum, B, L] at learning rate `lr` (the optimizer is built for lr 1, see `adamw`)."""

    def update(state: TrainState, micro: dict, lr, dropout_rng):
        loss, grads, total = accumulated_grads(model, state, micro, dropout_rng, label_smoothing)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, {"loss": loss, "grad_norm": trained_norm(grads), "tokens": total}

    return update


def make_eval_step(model, axis_name: str | None = None, lora_scale: float = 0.0):
    """`eval_step(params, batch) -> mean token loss` (no dropout). With LoRA pass `(frozen, adapters)` as params
    and the state's `lora_scale`."""

    def step(params, batch):
        if lora_scale:
            params = merge_lora(params[0], params[1], lora_scale)
        loss_sum, count = loss_sum_and_count(model, params, batch, train=False)
        if axis_name is not None:
            loss_sum, count = jax.lax.psum(loss_sum, axis_name), jax.lax.psum(count, axis_name)
        return loss_sum / jnp.maximum(count, 1)

    return step


# ---------------------------------------------------------------------- pmap helpers
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


# ---------------------------------------------------------------------- mesh and shardings
def data_parallel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over the given devices (default: every device of every process)."""
    return Mesh(np.array(devices or jax.devices()), ("data",))


def place_on_mesh(state, batch, mesh: Mesh):
    """Replicate the state and split the batch along 'data' (NamedSharding); jit the step over the results."""
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    batch = {k: jax.device_put(np.asarray(v), split) for k, v in batch.items()}
    return state, batch


def fsdp_spec(shape, devices: int, min_size: int = 2**14) -> PartitionSpec:
    """Shard an array along 'data' on its largest dimension divisible by the device count (FSDP-style);
    arrays smaller than `min_size` elements stay replicated."""
    if devices == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    dims = sorted((d for d in range(len(shape)) if shape[d] % devices == 0), key=lambda d: -shape[d])
    if not dims:
        return PartitionSpec()
    return PartitionSpec(*(["data" if d == dims[0] else None for d in range(len(shape))]))


def state_shardings(tree, mesh: Mesh, fsdp: bool = False, min_size: int = 2**14):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): replicated, or `fsdp_spec` when fsdp."""
    n = mesh.devices.size
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n, min_size) if fsdp else PartitionSpec()), tree)


def to_global(tree, shardings):
    """Host values (the same on every process) -> global jax.Arrays with the given shardings."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def to_host(tree):
    """Global jax.Arrays (replicated or sharded, over any processes) -> numpy on every process (collective)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


class Trainer:
    """Optimizer steps over a device mesh: every device of every process, batches split along 'data'.

    `fsdp=True` also shards params and optimizer state (arrays of `fsdp_min_size` elements or more) along
    'data': XLA gathers each layer's params where it runs and reduce-scatters the gradients. `optimizer` runs
    at learning rate 1 (`adamw`); `update` multiplies its step by the rate it is given.

        >>> trainer = Trainer(model, adamw(weight_decay=0.01), fsdp=True)
        >>> metrics = trainer.update([batch], lr=1e-4, seed=0)   # this process's micro-batches (numpy)
        >>> model.params = trainer.model_params()                # numpy, gathered from every device
    """

    def __init__(self, model, optimizer: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                 fsdp: bool = False, fsdp_min_size: int = 2**14, mesh: Mesh | None = None, seed: int = 0,
                 lora_rank: int = 0, lora_alpha: float | None = None, lora_targets=lora.ATTENTION_TARGETS,
                 adapters=None):
        self.model, self.mesh = model, mesh or data_parallel_mesh()
        host = jax.tree_util.tree_map(np.asarray, model.params)

        def create(params):
            return create_train_state(model, optimizer, params=params, seed=seed, lora_rank=lora_rank,
                                      lora_alpha=lora_alpha, lora_targets=lora_targets, adapters=adapters)

        self.shardings = state_shardings(jax.eval_shape(create, host), self.mesh, fsdp, fsdp_min_size)
        params = to_global(host, state_shardings(host, self.mesh, fsdp, fsdp_min_size))
        self.state = jax.jit(create, out_shardings=self.shardings)(params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, "data"))  # [accum, rows, length]
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self._update = jax.jit(make_update(model, label_smoothing),
                               in_shardings=(self.shardings, self.micro_sharding, replicated, replicated),
                               out_shardings=(self.shardings, replicated), donate_argnums=(0,))

        def evaluate(state, batch):
            return loss_sum_and_count(model, state.model_params(), batch, train=False)

        self._eval = jax.jit(evaluate, in_shardings=(self.shardings, self.batch_sharding), out_shardings=replicated)

    def local_rows(self, global_rows: int) -> slice:
        """The rows of a global batch of `global_rows` that this process feeds."""
        index = self.batch_sharding.addressable_devices_indices_map((global_rows,)).values()
        return slice(min(i[0].start or 0 for i in index), max(global_rows if i[0].stop is None else i[0].stop
                                                              for i in index))

    def update(self, micro_batches: list[dict], lr: float, seed: int) -> dict:
        """One optimizer step on this process's micro-batches (numpy dicts of equal shapes; micro-batch j of
        every process together make global micro-batch j); dropout keyed by `seed`. Metrics as floats."""
        local = {k: np.stack([m[k] for m in micro_batches]) for k in micro_batches[0]}
        micro = {k: jax.make_array_from_process_local_data(self.micro_sharding, v) for k, v in local.items()}
        self.state, metrics = self._update(self.state, micro, np.float32(lr), jax.random.PRNGKey(seed))
        return {k: float(v) for k, v in metrics.items()}

    def eval_sum_and_count(self, batch: dict) -> tuple[float, int]:
        """(sum of token losses, counted tokens) over the global batch whose rows `batch` holds; no dropout."""
        batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
        loss_sum, count = self._eval(self.state, batch)
        return float(loss_sum), int(count)

    def model_params(self):
        """The model's params as numpy (LoRA merged in), gathered on every process (collective)."""
        if self.state.frozen is None:
            return to_host(self.state.params)
        return to_host(jax.jit(TrainState.model_params)(self.state))

    def adapters(self):
        """The LoRA adapters as numpy (gathered; collective), or None without LoRA."""
        return None if self.state.frozen is None else to_host(self.state.params)

    def optimizer_tensors(self) -> dict[str, np.ndarray]:
        """The optimizer state as flat named numpy arrays ("0/inner_states/train/..."), gathered (collective)."""
        flat = traverse_util.flatten_dict(serialization.to_state_dict(to_host(self.state.opt_state)), sep="/")
        return {k: np.asarray(v) for k, v in flat.items()}

    def load_optimizer_tensors(self, tensors: dict) -> None:
        """Restore what `optimizer_tensors` returned (same model and options, any number of processes)."""
        template = serialization.to_state_dict(self.state.opt_state)
        flat = traverse_util.flatten_dict(template, sep="/", keep_empty_nodes=True)
        missing = sorted(k for k, v in flat.items() if v is not traverse_util.empty_node and k not in tensors)
        if missing:
            raise ConfigError(f"the optimizer state to resume lacks {', '.join(missing[:3])}; was it written with "
                              "other options?")
        values = {k: v if v is traverse_util.empty_node else np.asarray(tensors[k]) for k, v in flat.items()}
        host = serialization.from_state_dict(self.state.opt_state, traverse_util.unflatten_dict(values, sep="/"))
        self.state = self.state.replace(opt_state=to_global(host, self.shardings.opt_state))


# ---------------------------------------------------------------------- `blenderbot-mb train --backend flax`
def initialize_distributed() -> None:
    """`jax.distributed.initialize` from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or a
    cluster JAX detects itself, such as SLURM); nothing for one process. On CPU the collectives use gloo."""
    if jax.distributed.is_initialized():
        return
    address, count = os.environ.get("JAX_COORDINATOR_ADDRESS"), os.environ.get("JAX_NUM_PROCESSES")
    if not address and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        jax.distributed.initialize(coordinator_address=address, num_processes=int(count or 1),
                                   process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
    else:
        jax.distributed.initialize()


class FlaxEngine:
    """The Flax pieces of `blenderbot_mb.trainer.Run.fit`: one `Trainer` over every device of every process.

    The global batch is split along 'data' over all devices (`--fsdp` shards params and optimizer state too);
    each process pads its micro-batches to the width all processes agree on (a multiple of 16, so the step
    compiles for few shapes). Dropout of update `step` is keyed by `training.step_seed(seed, step)`: the same
    masks at any number of processes. `--precision bf16` computes in bfloat16 over float32 master weights.
    """

    framework = "numpy"

    def __init__(self, run):
        o = self.options = run.options
        initialize_distributed()
        if o.precision == "fp16":
            raise ConfigError("--precision fp16 needs loss scaling, which the flax backend does not do; use bf16")
        if o.lora_rank and o.lora_dropout:
            raise ConfigError("the flax backend merges adapters into the weights each step: --lora-dropout must be 0")
        self.rank, self.world_size = jax.process_index(), jax.process_count()
        if o.batch_size % jax.local_device_count():
            raise ConfigError(f"--batch-size {o.batch_size} is split over this process's {jax.local_device_count()} "
                              "devices: give a multiple of that")
        dtype = jnp.bfloat16 if o.precision == "bf16" else jnp.float32
        if run.model_folder is not None:
            model = FlaxBlenderbotForConditionalGeneration.from_pretrained(run.model_folder, dtype=dtype)
        else:
            model = FlaxBlenderbotForConditionalGeneration(run.config, seed=o.seed, dtype=dtype)
        if o.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        adapters = None
        if run.adapter_folder is not None:
            adapters = lora_from_modules(lora.read_adapters(run.adapter_folder)[0])
        self.model, self.max_length = model, run.max_length
        self.pad_token_id = run.tokenizer.pad_token_id
        self.trainer = Trainer(model, adamw(o.weight_decay, o.max_grad_norm), label_smoothing=o.label_smoothing,
                               fsdp=o.fsdp, seed=o.seed, lora_rank=o.lora_rank or 0, lora_alpha=o.lora_alpha,
                               lora_targets=lora.target_names(o.lora_ffn), adapters=adapters)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.asarray(values)
        return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(0)

    def _pad(self, batches: list[dict]) -> list[dict]:
        """Pad every batch to one width, the same on every process: the widest, rounded up to 16."""
        width = max(v.shape[1] for b in batches for v in b.values())  # contexts and replies
        if self.world_size > 1:
            width = int(np.max(multihost_utils.process_allgather(np.asarray(width))))
        width = max(width, min(-(-width // 16) * 16, self.max_length))
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return [{k: np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=fill[k]).astype(np.int32)
                 for k, v in b.items()} for b in batches]

    def train_step(self, micro_batches, *, lr: float, step: int, global_tokens: int) -> dict:
        # the step counts the global tokens itself, over the global micro-batches it is given
        return self.trainer.update(self._pad(micro_batches), lr, step_seed(self.options.seed, step))

    def eval_step(self, batch) -> tuple[float, int]:
        return self.trainer.eval_sum_and_count(self._pad([batch])[0])

    def model_tensors(self):
        params = self.trainer.model_params()
        return self.model.state_dict(params) if self.rank == 0 else None

    def adapter_tensors(self):
        adapters = self.trainer.adapters()
        return (lora_tensors(adapters) if adapters is not None else {}) if self.rank == 0 else None

    def optimizer_tensors(self):
        tensors = self.trainer.optimizer_tensors()
        return (tensors, {"backend": "flax"}) if self.rank == 0 else None

    def load_optimizer_tensors(self, tensors, meta) -> None:
        if meta.get("backend", "flax") != "flax":
            raise ConfigError(f"this checkpoint's optimizer state is from the {meta['backend']} backend; resume it "
                              "there (or start a new run from its model)")
        self.trainer.load_optimizer_tensors(tensors)

    def barrier(self) -> None:
        if self.world_size > 1:
            multihost_utils.sync_global_devices("blenderbot_mb checkpoint")

    def close(self) -> None:
        pass


def train(options=None, callbacks=(), **kwargs):
    """`blenderbot-mb train --backend flax` as a function: `train(data=..., out=..., model=..., lr=...)`; keyword
    arguments are the fields of `blenderbot_mb.training.TrainingOptions`, `callbacks` functions f(step, metrics)."""
    from ..trainer import train_with

    return train_with(FlaxEngine, "flax", options, callbacks, **kwargs)


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
    every = make_batch(tokenizer, pairs, limit)
    width = max(every["input_ids"].shape[1], every["labels"].shape[1])  # one shape for every batch
    losses = []
    for _ in range(epochs):
        rng.shuffle(pairs)
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - real)  # a fixed batch shape; the fillers count for nothing
            batch = make_batch(tokenizer, chunk, limit, width)
            batch["labels"][real:] = IGNORE_INDEX
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    model.params = state.params
    return losses
