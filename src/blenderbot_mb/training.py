"""The rules of training, stated once for every backend, and the options of `blenderbot-mb train`.

Loss. Labels hold token ids; a label equal to `IGNORE_INDEX` (-100) does not count, any other label counts
(the pad id included: the data code writes padding as -100, so pad never reaches the loss). The loss of an
optimizer step is the mean token cross-entropy over every counted label of the *global* batch (all
processes, all accumulated micro-batches): each piece contributes its sum and is divided by the global
count, so 2 processes x batch 4 make the same update as 1 process x batch 8. Logits are taken in float32.
With label smoothing e, a token's loss is (1 - e) * nll + e * mean over the vocabulary of -log p.

Optimizer. AdamW (beta1 0.9, beta2 0.999, eps 1e-8) with decoupled weight decay: a parameter p decays by
lr * weight_decay * p per step when `decays(name)`: Linear weights and embeddings, never biases, LayerNorm
weights or the frozen `final_logits_bias` (a buffer in the reference). Master weights are float32 in every
precision mode.

Clipping. After accumulation, the global L2 norm g of all trainable gradients is taken; when g > max_norm
every gradient is multiplied by max_norm / g (no epsilon). The norm before clipping is what gets logged.

Learning rate. `learning_rate(step)` for the 0-based update index (the first update uses step 0): linear
warmup from 0 over `warmup` updates, lr * step / warmup; then "constant" keeps lr, "linear" decays to 0 at
`total_steps`, "cosine" follows lr * (1 + cos(pi * progress)) / 2. `lr_schedule` is written with array
operations so optax can trace it.

Randomness. Dropout of update `step` on process `rank` is seeded with `step_seed(seed, step, rank)`, the
data order of an epoch with `epoch_order(n, seed, epoch)`: a resumed run needs no saved generator state to
draw exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

IGNORE_INDEX = -100  # a label that does not count in the loss (padding included)


def loss_dtype(logits_dtype: str) -> str:
    """The dtype the loss (and a softmax) is computed in: float32 for float32 and narrower logits (bf16 and
    fp16 logits are widened first: transformers computes their loss in their own dtype, a few 1e-3 off),
    float64 for float64."""
    return "float64" if str(logits_dtype).endswith("float64") else "float32"
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
NO_DECAY = ("bias", "layer_norm", "final_logits_bias", "scale")  # name parts of parameters that never decay


def counted(labels: np.ndarray) -> np.ndarray:
    """The loss mask: True where a label counts."""
    return labels != IGNORE_INDEX


def decays(name: str) -> bool:
    """Whether weight decay applies to a parameter, by its name in any backend's naming (HF PyTorch
    `model.encoder.layers.0.fc1.weight`, Flax `.../fc1/kernel`, Keras variable paths)."""
    parts = name.replace("/", ".").split(".")
    return not any(p in NO_DECAY or p.endswith("layer_norm") or p == "gamma" or p == "beta" for p in parts)


def lr_schedule(step, *, lr: float, warmup: int, total_steps: int, schedule: str, xp=np):
    """The learning rate of update `step` (0-based); `xp` is numpy or jax.numpy (traceable)."""
    step = xp.asarray(step, dtype=xp.float32)
    warm = step / max(warmup, 1)
    progress = xp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if schedule == "constant":
        after = xp.ones_like(progress)
    elif schedule == "linear":
        after = 1.0 - progress
    elif schedule == "cosine":
        after = 0.5 * (1.0 + xp.cos(math.pi * progress))
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    return lr * xp.where(step < warmup, warm, after)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of update `step` on process `rank` (dropout); a function of its arguments only."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits `n` examples."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class TrainingOptions:
    """Everything `blenderbot-mb train` and each backend's `training.train(...)` accept, checked once.

    Batch sizes: `batch_size` is the micro-batch of one process; an optimizer step sees
    batch_size x grad_accum x processes examples (the global batch).
    """

    data: str
    out: str
    model: str | None = None          # folder or hub id to fine-tune
    preset: str | None = None         # a new model of a published shape (blenderbot_mb.presets)
    config: str | None = None         # a new model from a config.json
    tokenizer: str | None = None      # tokenizer folder for a new model (default: trained on the data)
    tokenizer_vocab: int | None = None  # size of a trained tokenizer (default: the config's vocab_size)
    backend: str = "torch"
    epochs: float = 1.0
    max_steps: int | None = None      # when given, the run ends after this many updates
    batch_size: int = 8
    lr: float = 5e-5
    warmup: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    max_length: int | None = None     # context/reply token limit (default: the model's positions, 128)
    eval_data: str | None = None
    eval_every: int | None = None     # updates between evaluations (default: only at the end)
    save_every: int | None = None     # updates between checkpoints (default: only at the end)
    keep_checkpoints: int | None = 2  # newest checkpoint folders kept (None: all)
    log_every: int = 1
    resume: bool = False
    seed: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None   # default: lora_rank (scaling 1)
    lora_dropout: float = 0.0
    lora_ffn: bool = False            # also adapt fc1/fc2
    merge: bool = False               # with LoRA: also write the merged model to OUT/merged
    skip_bad_lines: bool = False
    fsdp: bool = False
    compile: bool | str = False       # torch: True or "layers": torch.compile every layer; "model": the whole
                                      # model (under DDP: split at its buckets); tf and flax always compile
    cuda_graphs: bool = False         # torch, CUDA: replay the whole update as one CUDA graph (fixed batch shape)
    loader_workers: int = 0           # processes encoding batches ahead (0: one thread of this process)
    device: str | None = None         # torch: cpu, cuda, cuda:1 (default: cuda if available)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # backend-specific settings

    def __post_init__(self):
        self.data, self.out = os.fspath(self.data), os.fspath(self.out)
        sources = [x for x in (self.model, self.preset, self.config) if x]
        if len(sources) > 1:
            raise ConfigError("give at most one of --model, --preset and --config")
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.backend in ("torch", "tf", "flax"), f"backend must be torch, tf or flax, got {self.backend!r}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
            (self.loader_workers >= 0, "loader_workers must be 0 (a thread) or more"),
            (self.epochs > 0 and float(self.epochs).is_integer(),
             f"epochs must be a whole number above 0 (max_steps stops within an epoch), got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
            (self.max_length is None or self.max_length >= 2, "max_length must be at least 2 (tokens of a context "
             "or reply, end token included)"),
            (self.log_every >= 1, "log_every must be at least 1"),
            (self.lr >= 0 and self.warmup >= 0 and self.weight_decay >= 0, "lr, warmup and weight_decay must be >= 0"),
            (all(math.isfinite(x) for x in (self.lr, self.warmup, self.weight_decay, self.lora_alpha or 1)),
             "lr, warmup, weight_decay and lora_alpha must be finite numbers"),
            (self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha must be positive"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be positive (or None)"),
            (self.lora_rank is None or self.lora_rank >= 1, "lora_rank must be at least 1"),
            (not self.merge or self.lora_rank, "--merge needs --lora-rank"),
            (self.compile in (False, True, "layers", "model"), f"compile must be true, 'layers' or 'model', got "
             f"{self.compile!r}"),
            (self.tokenizer is None or not self.model, "--tokenizer is for a new model (--preset/--config); "
             "--model brings its own"),
            (all(n is None or n >= 1 for n in (self.eval_every, self.save_every, self.keep_checkpoints)),
             "eval_every, save_every and keep_checkpoints must be at least 1"),
            (self.eval_every is None or self.eval_data, "eval_every needs eval_data"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        torch_only = [flag for flag, given in (("--device", self.device is not None), ("--compile", bool(self.compile)),
                                               ("--cuda-graphs", self.cuda_graphs)) if given]
        if torch_only and self.backend != "torch":
            what = "is a PyTorch option" if len(torch_only) == 1 else "are PyTorch options"
            framework = "TensorFlow" if self.backend == "tf" else "JAX"
            raise ConfigError(f"{' and '.join(torch_only)} {what} (--backend torch): the {self.backend} step is always "
                              f"compiled by XLA, and {framework} places it on its devices itself")

    @property
    def lora_scaling(self) -> float:
        return (self.lora_alpha or self.lora_rank) / self.lora_rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def learning_rate(self, step, total_steps: int, xp=np):
        return lr_schedule(step, lr=self.lr, warmup=self.warmup, total_steps=total_steps, schedule=self.schedule,
                           xp=xp)


__all__ = ["IGNORE_INDEX", "TrainingOptions", "counted", "decays", "lr_schedule", "step_seed", "epoch_order"]
