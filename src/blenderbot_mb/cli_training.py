"""The `train` and `merge-lora` commands of `blenderbot-mb` (registered on the app by `cli.py`).

    blenderbot-mb train --data dialogues.jsonl --out run/ --model facebook/blenderbot-400M-distill --max-steps 1000
    torchrun --nproc-per-node 2 -m blenderbot_mb.cli train --data d.jsonl --out run/ --model ... --fsdp
    blenderbot-mb merge-lora run/ merged/

Options mean the same on every backend (`blenderbot_mb.training`); `--backend` picks the framework.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(str, Enum):  # the framework a command runs on (the other commands' --backend too)
    torch = "torch"
    tf = "tf"
    flax = "flax"


def flag_names(message: str, options_class) -> str:
    """A message about TrainingOptions' fields with the fields named as this command's flags
    (`batch_size must be ...` -> `--batch-size must be ...`)."""
    import dataclasses
    import re

    fields = sorted((f.name for f in dataclasses.fields(options_class)), key=len, reverse=True)
    pattern = r"(?<![\w-])(" + "|".join(fields) + r")(?=,| and | must| needs| stops|$)"
    return re.sub(pattern, lambda m: "--" + m.group(1).replace("_", "-"), message)


def Opt(help: str, *names: str):  # noqa: N802  (a typer.Option with help text)
    return typer.Option(*names, help=help)


def train_command(
    data: Annotated[str, Opt("Training data: .jsonl (context/reply or turns) or TSV (context<TAB>reply).")],
    out: Annotated[str, Opt("Output folder: checkpoints, metrics.jsonl, the final model.")],
    model: Annotated[Optional[str], Opt("Model folder or hub id to fine-tune.", "--model", "-m")] = None,
    preset: Annotated[Optional[str], Opt("A new model of a published shape, e.g. blenderbot-400M-distill.")] = None,
    config: Annotated[Optional[str], Opt("A new model from this config.json.")] = None,
    tokenizer: Annotated[Optional[str], Opt("Tokenizer folder for a new model (default: trained on DATA).")] = None,
    backend: Annotated[Backend, Opt("Framework to train with.")] = Backend.torch,
    epochs: Annotated[int, Opt("Passes over the data (ignored with --max-steps).")] = 1,
    max_steps: Annotated[Optional[int], Opt("Stop after this many optimizer updates.")] = None,
    batch_size: Annotated[int, Opt("Examples per micro-batch per process.")] = 8,
    lr: Annotated[float, Opt("Peak learning rate (AdamW).")] = 5e-5,
    warmup: Annotated[int, Opt("Linear warmup updates.")] = 0,
    schedule: Annotated[Schedule, Opt("Learning-rate decay after warmup.")] = Schedule.linear,
    weight_decay: Annotated[float, Opt("Decoupled weight decay (matrices and embeddings only).")] = 0.0,
    max_grad_norm: Annotated[float, Opt("Clip the global gradient norm to this (0: no clipping).")] = 1.0,
    label_smoothing: Annotated[float, Opt("Label smoothing of the loss.")] = 0.0,
    grad_accum: Annotated[int, Opt("Micro-batches accumulated per update.")] = 1,
    precision: Annotated[Precision, Opt("fp32, or mixed bf16/fp16 with fp32 master weights.")] = Precision.fp32,
    gradient_checkpointing: Annotated[bool, Opt("Recompute layer activations in the backward pass.")] = False,
    max_length: Annotated[Optional[int], Opt("Token limit of contexts (cut from the left) and replies.")] = None,
    eval_data: Annotated[Optional[str], Opt("Evaluation data (same formats): loss and perplexity.")] = None,
    eval_every: Annotated[Optional[int], Opt("Evaluate every N updates (and at the end).")] = None,
    save_every: Annotated[Optional[int], Opt("Write a checkpoint every N updates (and at the end).")] = None,
    keep_checkpoints: Annotated[int, Opt("Newest checkpoints kept.")] = 2,
    log_every: Annotated[int, Opt("Write metrics every N updates.")] = 1,
    resume: Annotated[bool, Opt("Continue from the newest checkpoint in OUT.")] = False,
    seed: Annotated[int, Opt("Seed of initialization, data order and dropout.")] = 0,
    lora_rank: Annotated[Optional[int], Opt("Train LoRA adapters of this rank (base frozen).")] = None,
    lora_alpha: Annotated[Optional[float], Opt("LoRA alpha (scaling alpha / rank; default: the rank).")] = None,
    lora_ffn: Annotated[bool, Opt("Also adapt the feed-forward layers (fc1, fc2).")] = False,
    merge: Annotated[bool, Opt("With LoRA: also write the merged model to OUT/merged.")] = False,
    skip_bad_lines: Annotated[bool, Opt("Count and skip malformed data lines instead of stopping.")] = False,
    fsdp: Annotated[bool, Opt("Shard parameters, gradients and optimizer state (PyTorch FSDP2, Flax mesh).")] = False,
    compile: Annotated[bool, Opt("PyTorch: compile every layer with torch.compile (tf and flax always compile).")] = False,
    cuda_graphs: Annotated[bool, Opt("PyTorch on CUDA: replay each update as one CUDA graph (batches padded "
                                     "to batch size x max length).")] = False,
    loader_workers: Annotated[int, Opt("Processes encoding batches ahead (0: one thread).")] = 0,
    device: Annotated[Optional[str], Opt("PyTorch device (default: cuda:LOCAL_RANK if available, else cpu).")] = None,
    progress: Annotated[bool, Opt("Show a progress bar.")] = True,
):
    """Train or fine-tune a model on dialogue data: one process, or several started with the same options (torch:
    under torchrun; tf: TF_CONFIG on each worker; flax: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on each; docs/training.md)."""
    import importlib

    from ._backends import require
    from .errors import ConfigError
    from .training import TrainingOptions

    try:
        options = TrainingOptions(
            data=data, out=out, model=model, preset=preset, config=config, tokenizer=tokenizer, backend=backend.value,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, warmup=warmup, schedule=schedule.value,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, label_smoothing=label_smoothing,
            grad_accum=grad_accum, precision=precision.value, gradient_checkpointing=gradient_checkpointing,
            max_length=max_length, eval_data=eval_data, eval_every=eval_every, save_every=save_every,
            keep_checkpoints=keep_checkpoints, log_every=log_every, resume=resume, seed=seed, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_ffn=lora_ffn, merge=merge, skip_bad_lines=skip_bad_lines, fsdp=fsdp,
            compile=compile, cuda_graphs=cuda_graphs, loader_workers=loader_workers, device=device, progress=progress)
    except ConfigError as e:
        raise ConfigError(flag_names(str(e), TrainingOptions)) from None
    if fsdp and backend == Backend.tf:
        raise ConfigError("--fsdp shards on the torch (FSDP2) and flax (mesh) backends; tf mirrors every weight")
    require(backend.value)
    module = importlib.import_module(f"blenderbot_mb.{backend.value}.training")
    if not hasattr(module, "train"):
        raise ConfigError(f"the {backend.value} backend has no train() yet; use --backend torch")
    result = module.train(options)
    if result is not None and result.rank == 0:  # one summary per run, not one per process
        if result.loss is None:
            typer.echo(f"already complete: {result.steps} updates; {'adapters' if lora_rank else 'model'} in "
                       f"{result.model}", err=True)
            return
        skipped = [f"{n} malformed line{'s' * (n != 1)} skipped{where}" for n, where in (
            (result.skipped_lines, ""), (getattr(result, "skipped_eval_lines", 0), " in the evaluation data")) if n]
        read = "" if result.examples is None else f" on {result.examples} example{'s' * (result.examples != 1)}" + (
            f" ({'; '.join(skipped)})" if skipped else "")
        typer.echo(f"trained {result.steps} step{'s' * (result.steps != 1)}{read}; loss {result.loss:.4f}"
                   + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                   + f"; {'adapters' if lora_rank else 'model'} in {result.model}", err=True)


def merge_lora_command(
    adapters: Annotated[str, typer.Argument(help="Folder with adapter_config.json and adapter_model.safetensors.")],
    out: Annotated[str, typer.Argument(help="Output model folder.")],
    base: Annotated[Optional[str], Opt("Base model folder or hub id (default: the one the adapters name).")] = None,
):
    """Fold LoRA adapters into their base model; writes a plain HF-layout model folder."""
    from .lora import merge_folder

    typer.echo(f"wrote {merge_folder(base, adapters, out)}")


def register(app: typer.Typer, wrap) -> None:
    """Add the commands to `app`; `wrap` turns package errors into one-line messages."""
    app.command("train")(wrap(train_command))
    app.command("merge-lora")(wrap(merge_lora_command))
