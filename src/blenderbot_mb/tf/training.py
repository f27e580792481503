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
from keras import ops

from .. import lora
from ..data import encode_pairs, read_pairs  # noqa: F401  (read_pairs: re-exported for fit users)
from ..errors import ConfigError
from ..training import ADAM_BETAS, ADAM_EPS, IGNORE_INDEX, decays, step_seed
from .modeling import TFBlenderbotForConditionalGeneration, shift_tokens_right


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


# ---------------------------------------------------------------------- pieces of `blenderbot-mb train --backend tf`
def token_loss_sum(logits, labels, label_smoothing: float = 0.0):
    """Sum of token cross-entropies over the labels that count (blenderbot_mb.training), in float32."""
    labels = tf.cast(labels, tf.int32)
    keep = tf.cast(labels != IGNORE_INDEX, tf.float32)
    logp = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    nll = -tf.gather(logp, tf.where(labels == IGNORE_INDEX, 0, labels), axis=-1, batch_dims=2)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * tf.reduce_mean(logp, axis=-1)
    return tf.reduce_sum(nll * keep)


def enable_gradient_checkpointing(model) -> None:
    """Recompute every encoder and decoder layer in the backward pass (`keras.remat`, TF's recompute_grad).

    Dropout draws again when a layer is recomputed, so with dropout the gradient's masks differ from the
    forward pass's; without dropout the gradients are exact."""
    for layer in [*model.get_encoder().layers, *model.get_decoder().layers]:
        layer.call = _checkpointed(layer.call)


def _checkpointed(call):
    def run(hidden_states, *args, training=False, **kwargs):
        if not training:
            return call(hidden_states, *args, training=training, **kwargs)
        encoder = kwargs.pop("encoder_hidden_states", None)  # an input of the recomputed block: it gets gradients

        def block(h, *enc):
            return call(h, *args, encoder_hidden_states=enc[0], training=True, **kwargs)[0] if enc else \
                call(h, *args, training=True, **kwargs)[0]

        hidden = keras.remat(block)(hidden_states, *(() if encoder is None else (encoder,)))
        outputs = 2 if encoder is None and "encoder_attention_mask" not in kwargs else 4
        return (hidden,) + (None,) * (outputs - 1)

    return run


def add_lora(model, rank: int, alpha: float | None = None, ffn: bool = False, seed: int = 0) -> dict:
    """Keras' own LoRA (`Dense.enable_lora`) on the attention projections (and fc1/fc2 with `ffn`); every other
    weight frozen. A starts as `blenderbot_mb.lora.initial_a(module, in, rank, seed)` (uniform in +-1/sqrt(in), the
    same in every backend), B zero. Returns {module name: Dense layer}. The model's `state_dict()` then holds the
    merged weights."""
    targets = lora.target_names(ffn)
    kernels = {id(var): name[: -len(".weight")] for name, (var, transposed) in model.named_weights().items()
               if transposed}
    layers = {}
    for layer in model._flatten_layers(include_self=False):
        module = kernels.get(id(getattr(layer, "_kernel", None)))
        if isinstance(layer, keras.layers.Dense) and module and module.split(".")[-1] in targets:
            layer.enable_lora(rank, lora_alpha=alpha or rank, b_initializer="zeros")
            layer.lora_kernel_a.assign(lora.initial_a(module, layer._kernel.shape[0], rank, seed).T)
            layers[module] = layer
    adapters = {id(v) for layer in layers.values() for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    for variable in model.trainable_variables:
        if id(variable) not in adapters:
            variable.trainable = False
    return layers


def adapter_tensors(layers: dict) -> dict[str, np.ndarray]:
    """The adapters of `add_lora` in the file names and PyTorch layout of `blenderbot_mb.lora`."""
    out = {}
    for module, layer in layers.items():
        key_a, key_b = lora.adapter_keys(module)
        out[key_a] = np.ascontiguousarray(keras.ops.convert_to_numpy(layer.lora_kernel_a).T)  # [r, in]
        out[key_b] = np.ascontiguousarray(keras.ops.convert_to_numpy(layer.lora_kernel_b).T)  # [out, r]
    return out


def load_adapters(layers: dict, modules: dict) -> None:
    """Assign {module: (A [r, in], B [out, r])} (as `blenderbot_mb.lora.read_adapters` returns) to `add_lora`'s layers."""
    missing = sorted(set(layers) ^ set(modules))
    if missing:
        raise ConfigError(f"the adapters to resume do not match the model's LoRA layers: {', '.join(missing[:3])}")
    for module, (a, b) in modules.items():
        layers[module].lora_kernel_a.assign(np.asarray(a, np.float32).T)
        layers[module].lora_kernel_b.assign(np.asarray(b, np.float32).T)


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over the local GPUs (or CPUs)."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def worker_rank(resolver) -> tuple[int, int]:
    """(rank, world size) of this process among the workers of a MultiWorkerMirroredStrategy cluster: the
    chief (TF_CONFIG's "chief" task if there is one, else worker 0) is rank 0, then the workers by index.
    (0, 1) without TF_CONFIG."""
    if resolver is None or not os.environ.get("TF_CONFIG"):
        return 0, 1
    if resolver.task_type not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG task type {resolver.task_type!r}: training runs on \"chief\" and \"worker\" "
                          "tasks only")
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    rank = 0 if resolver.task_type == "chief" else chiefs + int(resolver.task_id or 0)
    return rank, chiefs + len(jobs.get("worker", []))


class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with epsilon where `blenderbot_mb.training` (PyTorch, optax) puts it: added to the square
    root of the bias-corrected second moment. Keras adds it to the uncorrected one, which moves weights whose
    gradients are near epsilon (rarely seen positions and tokens) by other amounts than the other backends."""

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        correct1 = 1 - ops.power(ops.cast(self.beta_1, dtype), step)
        correct2 = 1 - ops.power(ops.cast(self.beta_2, dtype), step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        gradient = ops.cast(gradient, dtype)
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))
        step_size = ops.cast(learning_rate, dtype) / correct1
        self.assign_sub(variable, step_size * m / (ops.sqrt(v / correct2) + self.epsilon))


class Trainer(keras.Model):
    """`model` for `fit`: one optimizer update per batch of stacked micro-batches [rows, accum, length].

    Each replica sums the gradients of its rows' token losses divided by the global token count (all-reduced),
    over every micro-batch; the sum over replicas is clipped to `max_grad_norm` (global L2 norm) and handed to
    the optimizer. Keras' optimizer sums gradients over replicas itself, so it receives each replica's share.

    The steps return their (all-reduced, so equal on every replica) numbers with shape [1]: under
    MultiWorkerMirroredStrategy Keras averages step outputs over workers along axis 0, which a scalar lacks."""

    def __init__(self, model, label_smoothing: float = 0.0, max_grad_norm: float | None = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.model, self.label_smoothing, self.max_grad_norm = model, label_smoothing, max_grad_norm
        self.built = True  # the wrapped model is

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build once the optimizer is (TFEngine builds it before the first `fit`). Keras' own version
        reduces the first batch of every `fit` over all replicas to learn its shapes: a collective per call,
        which fails on dict batches under MultiWorkerMirroredStrategy (keras-team/keras#20329)."""
        if self.optimizer is None or not self.optimizer.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _loss_sum(self, batch, training):
        c = self.model.config
        decoder_input_ids = shift_tokens_right(batch["labels"], c.pad_token_id, c.decoder_start_token_id)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            decoder_input_ids=decoder_input_ids, use_cache=False, training=training).logits
        return token_loss_sum(logits, batch["labels"], self.label_smoothing if training else 0.0)

    def train_step(self, data):
        ctx = tf.distribute.get_replica_context()
        variables = self.trainable_variables
        total = ctx.all_reduce("sum", tf.reduce_sum(tf.cast(data["labels"] != IGNORE_INDEX, tf.float32)))
        grads = [tf.zeros_like(v) for v in variables]
        loss = tf.zeros((), tf.float32)
        for j in range(data["labels"].shape[1]):  # the micro-batches, one after the other
            with tf.GradientTape() as tape:
                share = self._loss_sum({k: v[:, j] for k, v in data.items()}, training=True) / tf.maximum(total, 1.0)
            grads = [g + tf.convert_to_tensor(d) for g, d in zip(grads, tape.gradient(share, variables), strict=True)]
            loss += share
        grads, loss = ctx.all_reduce("sum", grads), ctx.all_reduce("sum", loss)
        norm = tf.linalg.global_norm(grads)
        if self.max_grad_norm:
            grads, _ = tf.clip_by_global_norm(grads, self.max_grad_norm, use_norm=norm)
        replicas = tf.cast(ctx.num_replicas_in_sync, tf.float32)
        self.optimizer.apply_gradients(zip([g / replicas for g in grads], variables, strict=True))
        return {"loss": loss[None], "grad_norm": norm[None]}  # [1]: see the class docstring

    def test_step(self, data):
        ctx = tf.distribute.get_replica_context()
        data = {k: v[:, 0] for k, v in data.items()}  # one micro-batch
        loss_sum = self._loss_sum(data, training=False)
        count = tf.reduce_sum(tf.cast(data["labels"] != IGNORE_INDEX, tf.float32))
        return {"loss_sum": ctx.all_reduce("sum", loss_sum)[None], "count": ctx.all_reduce("sum", count)[None]}


def _number(value) -> float:
    """A step output of `Trainer` as a float (shape [1] on one worker, reduced to a scalar across workers)."""
    return float(np.reshape(value, -1)[0])


def distribute(strategy: tf.distribute.Strategy, stacked: dict):
    """One batch of stacked micro-batches {key: [rows, accum, width]} of this process, as a distributed dataset
    in which each local replica takes its slice of the rows."""
    replicas = len(strategy.extended.worker_devices)
    rows = np.array_split(np.arange(len(stacked["labels"])), replicas)
    parts = [{k: np.asarray(v[r], np.int32) for k, v in stacked.items()} for r in rows]
    # rows and width left open: the train function is traced once for every batch
    spec = {k: tf.TensorSpec((None, v.shape[1], None), tf.int32) for k, v in stacked.items()}
    return strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_generator(lambda: iter(parts), output_signature=spec))


class TFEngine:
    """The TensorFlow pieces of `blenderbot_mb.trainer.Run.fit`: `model.fit` inside a tf.distribute strategy.

    Every update is one `fit` step of `Trainer` on this process's micro-batches, split over the strategy's
    replicas. Dropout of update `step` is seeded with `training.step_seed(seed, step, rank)`. `--precision bf16`
    runs Keras' mixed_bfloat16 policy (float32 variables).
    """

    framework = "numpy"

    def __init__(self, run):
        o = self.options = run.options
        if o.precision == "fp16":
            raise ConfigError("--precision fp16 needs loss scaling, which the tf backend does not do here; use bf16")
        if o.lora_rank and o.lora_dropout:
            raise ConfigError("the tf backend uses Keras' LoRA, which has no dropout: --lora-dropout must be 0")
        self.strategy = strategy = distribution_strategy()
        self.rank, self.world_size = worker_rank(getattr(strategy, "cluster_resolver", None))
        self.local_replicas = len(strategy.extended.worker_devices)
        self.max_length, self.pad_token_id = run.max_length, run.tokenizer.pad_token_id
        policy = "mixed_bfloat16" if o.precision == "bf16" else "float32"
        keras.utils.set_random_seed(o.seed)
        with strategy.scope():
            if run.model_folder is not None:
                model = TFBlenderbotForConditionalGeneration.from_pretrained(run.model_folder, dtype=policy)
            else:
                previous = keras.config.dtype_policy()
                keras.config.set_dtype_policy(policy)
                try:
                    model = TFBlenderbotForConditionalGeneration(run.config)
                finally:
                    keras.config.set_dtype_policy(previous)
            self.lora_layers = add_lora(model, o.lora_rank, o.lora_alpha, o.lora_ffn, o.seed) if o.lora_rank else {}
            if run.adapter_folder is not None:
                load_adapters(self.lora_layers, lora.read_adapters(run.adapter_folder)[0])
            if o.gradient_checkpointing:
                enable_gradient_checkpointing(model)
            self.model = model
            self.trainer = Trainer(model, o.label_smoothing, o.max_grad_norm)
            optimizer = AdamW(learning_rate=o.lr, weight_decay=o.weight_decay, beta_1=ADAM_BETAS[0],
                                               beta_2=ADAM_BETAS[1], epsilon=ADAM_EPS)
            optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if not decays(v.path)])
            self.trainer.compile(optimizer=optimizer, jit_compile=False)
            optimizer.build(self.trainer.trainable_variables)
        self.seed_generators = [layer.seed_generator for layer in model._flatten_layers()
                                if isinstance(layer, keras.layers.Dropout) and hasattr(layer, "seed_generator")]

    # ------------------------------------------------------------------ collectives
    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.asarray(values)
        share = tf.constant(np.asarray(values, np.float64) / self.local_replicas)
        if getattr(self, "_sum_fn", None) is None:  # in a tf.function: collectives run eagerly are slow and warned of
            self._sum_fn = tf.function(lambda x: self.strategy.reduce(
                "sum", self.strategy.run(tf.identity, args=(x,)), axis=None), reduce_retracing=True)
        total = self._sum_fn(share)
        return np.rint(total.numpy()).astype(np.asarray(values).dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.all_sum(np.zeros(1))

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ steps
    def _dataset(self, batches: list[dict]):
        """Stacked micro-batches [rows, accum, width] (width agreed by all processes, rounded up to 16), each
        replica taking its slice of this process's rows."""
        width = max(v.shape[1] for b in batches for v in b.values())  # contexts and replies
        if self.world_size > 1:
            widths = np.zeros(self.world_size, np.int64)
            widths[self.rank] = width
            width = int(self.all_sum(widths).max())
        width = max(width, min(-(-width // 16) * 16, self.max_length))
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        stacked = {k: np.stack([np.pad(b[k], ((0, 0), (0, width - b[k].shape[1])), constant_values=fill[k])
                                for b in batches], axis=1) for k in fill}
        return distribute(self.strategy, stacked)

    def train_step(self, micro_batches, *, lr: float, step: int, global_tokens: int) -> dict:
        seed = step_seed(self.options.seed, step, self.rank)
        for i, generator in enumerate(self.seed_generators):  # this update's dropout, whatever ran before
            generator.state.assign(np.array([seed % 2**31, i], dtype=generator.state.dtype))
        self.trainer.optimizer.learning_rate = lr
        logs = self.trainer.fit(self._dataset(micro_batches), steps_per_epoch=1, verbose=0, shuffle=False).history
        return {k: _number(logs[k][-1]) for k in ("loss", "grad_norm")}

    def eval_step(self, batch) -> tuple[float, int]:
        logs = self.trainer.evaluate(self._dataset([batch]), steps=1, verbose=0, return_dict=True)
        return _number(logs["loss_sum"]), int(round(_number(logs["count"])))

    # ------------------------------------------------------------------ state
    def model_tensors(self):
        return self.model.state_dict() if self.rank == 0 else None

    def adapter_tensors(self):
        return adapter_tensors(self.lora_layers) if self.rank == 0 else None

    def optimizer_tensors(self):
        """AdamW's variables in creation order (iterations, then moments per trainable weight)."""
        variables = self.trainer.optimizer.variables
        tensors = {f"{i:04d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(variables)}
        return (tensors, {"backend": "tf"}) if self.rank == 0 else None

    def load_optimizer_tensors(self, tensors, meta) -> None:
        if meta.get("backend", "tf") != "tf":
            raise ConfigError(f"this checkpoint's optimizer state is from the {meta['backend']} backend; resume it "
                              "there (or start a new run from its model)")
        variables = self.trainer.optimizer.variables
        shapes = [tuple(v.shape) for v in variables]
        if sorted(tensors) != [f"{i:04d}" for i in range(len(variables))] or \
                [tuple(tensors[f"{i:04d}"].shape) for i in range(len(variables))] != shapes:
            raise ConfigError("the optimizer state to resume does not match this model and options")
        for i, variable in enumerate(variables):
            variable.assign(tensors[f"{i:04d}"])


def train(options=None, callbacks=(), **kwargs):
    """`blenderbot-mb train --backend tf` as a function: `train(data=..., out=..., model=..., lr=...)`; keyword
    arguments are the fields of `blenderbot_mb.training.TrainingOptions`, `callbacks` functions f(step, metrics)."""
    from ..trainer import train_with

    return train_with(TFEngine, "tf", options, callbacks, **kwargs)
