"""The training loop of `blenderbot-mb train`, written once; a backend supplies only its framework pieces.

    run = prepare_run(TrainingOptions(data="d.jsonl", out="out", model="facebook/blenderbot-400M-distill"))
    result = run.fit(engine)            # engine: blenderbot_mb.torch.training.TorchEngine(run), ...

`prepare_run` does everything that needs no framework, before any step: checks the options, reads the
data once (a malformed line fails here, naming file and line), finds the checkpoint to resume from,
loads or trains the tokenizer and settles the model config. `Run.fit(engine)` then loops: global batches
in the seeded epoch order, split over processes and accumulation micro-batches; the learning rate of each
update; metrics (DIR/metrics.jsonl, TensorBoard when installed, a tqdm bar with loss, tokens/s, lr, ETA);
evaluation (loss, perplexity); checkpoints.

An engine (see `Engine`) builds its model from `run.model_folder` (weights to load, None for a new model
from `run.config` seeded with `options.seed`), `run.adapter_folder` (LoRA adapters to resume) and
`run.options`, and implements one update on a list of micro-batches (numpy dicts) whose loss is
normalized by the global token count it is given (the rule of `blenderbot_mb.training`).

Output folder: `checkpoint-N/` every `save_every` updates and at the end (an HF model folder plus
`optimizer.safetensors` and `trainer_state.json`; LoRA runs hold the adapters instead of the model),
each written in a temporary folder that replaces it whole; at the end DIR/model receives the trained model
(LoRA: DIR/adapter the adapters, and with `merge` DIR/merged the merged model). `resume` continues from the newest complete
checkpoint: weights, optimizer state, update count, data position (epoch and examples consumed, valid at
any number of processes) and randomness (a function of seed and update, see `training.step_seed`).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import lora
from .config import BlenderbotConfig
from .data import TrainingData, encode_examples
from .errors import ConfigError, InputError, Interrupted, TrainingError
from .fileio import atomic_write_text
from .training import TrainingOptions, counted, epoch_order

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
MODEL_DIR, ADAPTER_DIR, MERGED_DIR = "model", "adapter", "merged"  # the end result, in DIR
# Options a resumed run may change freely (how it runs, not what it computes), and those it must keep.
RESUME_FREE = {"out", "resume", "progress", "loader_workers", "device", "log_every", "save_every", "keep_checkpoints",
               "eval_data", "eval_every", "skip_bad_lines", "merge", "compile", "cuda_graphs", "extra",
               "batch_size", "grad_accum"}  # these two with the process count: compared as the global batch
RESUME_FIXED = {"lora_rank", "lora_ffn"}
RUN_FILES = (METRICS_NAME, "tensorboard", MODEL_DIR, ADAPTER_DIR)  # what marks a folder as a training run's output


class Engine(Protocol):
    """The framework pieces of a backend. Collective methods are called by every process in the same order."""

    rank: int            # this process
    world_size: int      # processes taking part (1 without distribution)
    framework: str       # the safetensors framework of the tensors returned below: "pt", "tf", "flax", "numpy"

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of `values` over processes (collective)."""

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], *, lr: float, step: int,
                   global_tokens: int) -> dict[str, float]:
        """One update: gradients of sum(token losses) / global_tokens over every process's micro-batches,
        clipped, then the optimizer at learning rate `lr`; dropout seeded with training.step_seed(seed, step,
        rank). Returns {"loss": global mean loss, "grad_norm": norm before clipping} (collective), as numbers
        or device scalars: the loop reads them (float) only when it logs, so an engine need not wait for its
        device at every update."""

    def eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of token losses, counted tokens) over every process's batch, without dropout (collective)."""

    def model_tensors(self) -> dict[str, Any] | None:
        """The full model in canonical HF names (training.decays names), on rank 0; None elsewhere. With
        LoRA: the base merged with the adapters (collective)."""

    def adapter_tensors(self) -> dict[str, Any] | None:
        """LoRA adapters in `lora` file names ({} without LoRA) on rank 0 (collective)."""

    def optimizer_tensors(self) -> tuple[dict[str, Any], dict] | None:
        """Full optimizer state as flat named tensors plus JSON metadata, on rank 0 (collective)."""

    def load_optimizer_tensors(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        """Restore what `optimizer_tensors` returned, at this process count (collective)."""

    def barrier(self) -> None: ...

    def close(self) -> None: ...


def keep_python_sigterm_handler() -> None:
    """Put this process's Python SIGTERM handler back in place (the command's: SIGTERM stops a run as Ctrl-C does,
    docs/training.md). The distributed runtimes install their own in C++ as they connect (jax.distributed's
    preemption notifier, TensorFlow's multi-worker coordination service), which only takes note of the signal,
    so that a scheduler's SIGTERM was ignored until its SIGKILL. Nothing changes where Python has no handler."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


STUCK_AFTER_SIGNAL_S = 15.0  # how long a multi-process run may take to stop after SIGTERM / Ctrl-C


def end_if_stuck_after_a_signal(describe, grace: float = STUCK_AFTER_SIGNAL_S):
    """In a multi-process run, end this process with exit code 130 `grace` seconds after SIGTERM or SIGINT
    if it is still running then, printing `error: <describe()>` (nothing when it is empty). Returns the
    function that disarms it (a run that ends without a signal calls it).

    A process blocked in a collective whose peers have stopped on the signal does not come back to Python to
    raise KeyboardInterrupt until the runtime gives up on them (jax.distributed's heartbeat: 100 s; its exit
    waits for them too). The C-level signal handler still writes to `signal.set_wakeup_fd`, which a thread
    watches here. A prompt stop (the usual case) ends the process before the thread acts."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # (not the main thread of the main interpreter)
        os.close(read)
        os.close(write)
        return lambda: None

    def watch():
        while True:
            data = os.read(read, 64)
            if not data:  # disarmed
                os.close(read)
                return
            if {signal.SIGINT, signal.SIGTERM} & set(data):
                break
        time.sleep(grace)
        message = describe()
        if message:
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
        os._exit(130)

    threading.Thread(target=watch, name="stop-if-stuck", daemon=True).start()

    def disarm():
        signal.set_wakeup_fd(previous)
        os.close(write)

    return disarm


def interrupted_message(step: int, last_checkpoint: str | None) -> str:
    """What rank 0 says when a run stops on SIGTERM or Ctrl-C."""
    went_on = (f"{last_checkpoint} holds the last checkpoint: the same command with --resume goes on from it"
               if last_checkpoint else "no checkpoint was written yet (--save-every)")
    return f"interrupted after {step} update{'s' * (step != 1)}; {went_on}"


@dataclass
class TrainResult:
    out: str
    model: str                   # the trained model (DIR/model), or LoRA adapters (DIR/adapter)
    steps: int
    loss: float | None           # the last update's loss
    eval_loss: float | None
    checkpoint: str | None       # the last checkpoint folder
    rank: int = 0                # the process that returned it (0 alone reports under torchrun and the like)
    examples: int | None = None  # training examples read from --data
    skipped_lines: int = 0       # its malformed lines skipped (--skip-bad-lines)
    skipped_eval_lines: int = 0  # ... and those of the evaluation data


# ---------------------------------------------------------------------- checkpoints
def checkpoint_step(name: str) -> int | None:
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
    return int(m.group(1)) if m else None


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoint folders in `out`, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [(checkpoint_step(n), n) for n in os.listdir(out)]
    return [os.path.join(out, n) for s, n in sorted(f for f in found if f[0] is not None)
            if os.path.isfile(os.path.join(out, n, STATE_NAME))]


def latest_checkpoint(out: str) -> str | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_NAME), encoding="utf-8") as f:
        return json.load(f)


def write_folder(target: str, fill) -> None:
    """Write a folder whole: `fill(tmp)` fills a temporary folder that then replaces `target`."""
    from .fileio import folder_transaction

    with folder_transaction(target) as tmp:
        fill(tmp)


# ---------------------------------------------------------------------- metrics
class TensorBoard:
    """Scalars as TensorBoard event files, with the `tensorboard` package alone (no framework)."""

    def __init__(self, folder: str, start: int = 0):
        import types

        if "tensorflow" not in sys.modules:  # tensorboard's own switch to its file layer without TensorFlow
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(folder)
        # A restart from update `start`: TensorBoard drops what earlier files logged after it (the part of an
        # interrupted run that is trained again), as torch's SummaryWriter(purge_step=...) asks it to.
        self.writer.add_event(Event(wall_time=time.time(), step=start + 1,
                                    session_log=SessionLog(status=SessionLog.START)))

    def add(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def rewind(path: str, start: int) -> None:
    """Drop the records of updates after `start` from a metrics file (a run resumed from update `start` logs
    them again; from update 0, every record goes). Lines that are not records are kept."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()

    def kept(line: str) -> bool:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return bool(line.strip())
        return not isinstance(step, int) or (start > 0 and step <= start)

    keep = [line if line.endswith("\n") else line + "\n" for line in lines if kept(line)]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


class Metrics:
    """DIR/metrics.jsonl (appended, one JSON object per line), TensorBoard and the progress bar."""

    def __init__(self, out: str, enabled: bool, total: int, start: int, progress: bool):
        self.enabled = enabled
        self.file = self.tb = self.bar = None
        if not enabled:
            return
        path = os.path.join(out, METRICS_NAME)
        rewind(path, start)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            self.tb = TensorBoard(os.path.join(out, "tensorboard"), start)
        except ImportError:
            self.tb = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="training", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, record: dict, postfix: dict | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            self.tb.add(record["step"], {k: v for k, v in record.items() if k not in ("step", "epoch", "time")
                                         and isinstance(v, (int, float))})
        if self.bar is not None and postfix is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)
        elif postfix is None:  # an evaluation, the skipped lines: a line of their own on stderr, bar or not
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        for thing in (self.bar, self.tb, self.file):
            if thing is not None:
                thing.close()


# ---------------------------------------------------------------------- the run
class Run:
    """Everything decided before the first update; `fit(engine)` trains."""

    def __init__(self, options: TrainingOptions):
        self.options = o = options
        self.data = TrainingData(o.data, skip_bad_lines=o.skip_bad_lines)
        self.eval_data = TrainingData(o.eval_data, skip_bad_lines=o.skip_bad_lines) if o.eval_data else None
        self._check_out()
        self.resume_from = latest_checkpoint(o.out) if o.resume else None
        self.state = read_state(self.resume_from) if self.resume_from else None
        written_by = (self.state or {}).get("options", {}).get("backend")
        if written_by and written_by != o.backend:
            raise ConfigError(f"{self.resume_from} was written by the {written_by} backend, whose optimizer state "
                              f"only it reads: resume with --backend {written_by} (or start a new --out from its "
                              f"model with --model {self.resume_from})")
        self.changed = self._changed_options()
        self.adapter_folder = None
        if self.resume_from and o.lora_rank:
            self.model_folder, self.adapter_folder = self._resolve(o.model), self.resume_from
        elif self.resume_from:
            self.model_folder = self.resume_from
        elif o.model:
            self.model_folder = self._resolve(o.model)
        elif o.preset or o.config:
            self.model_folder = None
        else:
            raise ConfigError("give --model (to fine-tune) or --preset/--config (a new model)")
        if o.lora_rank and not o.model:
            raise ConfigError("--lora-rank adapts an existing model: give --model")
        self.tokenizer, self.config, self.generation_config = self._model_files()
        self.max_length = min(o.max_length or self.config.max_position_embeddings, self.config.max_position_embeddings)

    def _changed_options(self) -> list[str]:
        """The options that differ from those of the run that wrote the checkpoint, as `name value (was value)`;
        those that decide what the checkpoint holds are refused."""
        if not self.state:
            return []
        before, now = self.state.get("options", {}), self.options.to_dict()
        changed = [k for k in now if k in before and before[k] != now[k] and k not in RESUME_FREE]
        for k in changed:
            if k in RESUME_FIXED:
                raise ConfigError(f"{self.resume_from} was trained with {_option(k, before[k])}, which decides "
                                  f"what it holds; resume with that (this run asks for {_option(k, now[k])})")
        return [f"{k} {now[k]} (was {before[k]})" for k in changed]

    @staticmethod
    def _resolve(model: str) -> str:
        from .hub import resolve_folder

        return resolve_folder(model)

    def _check_out(self) -> None:
        o = self.options
        if os.path.isfile(o.out):
            raise ConfigError(f"--out {o.out} is a file; give a folder")
        names = [n for n in os.listdir(o.out) if not n.startswith(".")] if os.path.isdir(o.out) else []
        if os.path.ismount(o.out):  # a volume's lost+found is the file system's, not content
            names = [n for n in names if n != "lost+found"]
        is_run = any(n in RUN_FILES or checkpoint_step(n) is not None for n in names)
        if names and not (o.resume and is_run):
            hint = ""
            if is_run:
                hint = ("pass --resume to continue that run, or " if latest_checkpoint(o.out) else
                        "it holds a run stopped before its first checkpoint: --resume starts it over, or ")
            raise ConfigError(f"--out {o.out} is not empty; {hint}choose a new folder (nothing is overwritten)")

    def _model_files(self):
        from .generation_config import GenerationConfig
        from .tokenizer import BlenderbotTokenizer, train_tokenizer

        o = self.options
        if self.model_folder is not None:  # a model (or a checkpoint) with its tokenizer
            folder = self.resume_from or self.model_folder
            config = BlenderbotConfig.from_pretrained(self.model_folder)
            tokenizer = BlenderbotTokenizer.from_pretrained(folder)
            return tokenizer, config, GenerationConfig.from_pretrained(self.model_folder, config)
        config = BlenderbotConfig.from_preset(o.preset) if o.preset else BlenderbotConfig.from_json_file(o.config)
        if o.tokenizer:
            tokenizer = BlenderbotTokenizer.from_pretrained(o.tokenizer)
        else:  # a byte-level BPE learned from the training data
            tokenizer = train_tokenizer(self.data.texts(), vocab_size=(o.tokenizer_vocab or config.vocab_size) - 1)
        config = config.replace(vocab_size=len(tokenizer), architectures=["BlenderbotForConditionalGeneration"])
        return tokenizer, config, GenerationConfig.from_model_config(config)

    # ------------------------------------------------------------------ batches
    def global_batch(self, world_size: int) -> int:
        return self.options.batch_size * self.options.grad_accum * world_size

    def micro_batches(self, data: TrainingData, indices: np.ndarray, accum: int, world_size: int, rank: int):
        """This process's `accum` micro-batches of one global batch (see `micro_batches`)."""
        return micro_batches(data, self.tokenizer, self.max_length, self.options.batch_size, indices, accum,
                             world_size, rank)

    def schedule(self, epoch: int, position: int, world_size: int):
        """(epoch, position, example indices) of every global batch from (epoch, position) on."""
        size, order = self.global_batch(world_size), None
        while True:
            if position >= len(self.data):
                epoch, position = epoch + 1, 0
            if order is None or order[0] != epoch:
                order = (epoch, epoch_order(len(self.data), self.options.seed, epoch))
            indices = order[1][position:position + size]
            yield epoch, position, indices
            position += len(indices)

    def total_steps(self, world_size: int, step: int, epoch: int, position: int) -> int:
        o = self.options
        if o.max_steps:
            return o.max_steps
        per_epoch = math.ceil(len(self.data) / self.global_batch(world_size))
        left = math.ceil((len(self.data) - position) / self.global_batch(world_size))
        return step + left + (int(o.epochs) - epoch - 1) * per_epoch

    # ------------------------------------------------------------------ the loop
    # options each process may set for itself: paths (each machine its own), its device, its output
    PER_PROCESS = frozenset({"data", "eval_data", "out", "model", "config", "tokenizer", "device", "progress",
                             "loader_workers", "resume", "extra"})

    def agreement(self) -> dict[str, str]:
        """What every process of a run must agree on, by name: the options (as the command line names them) but
        `PER_PROCESS`, and the training and evaluation data (their number of examples and 16 of them)."""
        values = {"--" + k.replace("_", "-"): repr(v) for k, v in self.options.to_dict().items()
                  if k not in self.PER_PROCESS}
        for name, data in (("--data", self.data), ("--eval-data", self.eval_data)):
            if data is not None:
                sample = [repr(data[int(i)]) for i in np.unique(np.linspace(0, len(data) - 1, 16).astype(int))]
                values[name] = repr((len(data), sample))
        return values

    def check_agreement(self, engine: Engine) -> None:
        """ConfigError on every process, naming what differs, unless the processes got the same options and
        data: a different --max-steps had one process wait forever for a collective the others never ran, a
        different --lr or --seed trained diverging replicas without a word."""
        values = self.agreement()
        names = sorted(values)
        table = np.zeros((engine.world_size, len(names)), np.float64)  # 16-bit digests: exact in any float
        table[engine.rank] = [zlib.crc32(values[n].encode()) & 0xFFFF for n in names]
        table = np.asarray(engine.all_sum(table.reshape(-1))).reshape(engine.world_size, len(names))
        differ = [n for j, n in enumerate(names) if len(set(table[:, j].tolist())) > 1]
        if differ:
            raise ConfigError(f"the {engine.world_size} processes were started with different {', '.join(differ)} "
                              f"(this is rank {engine.rank}): give every process the same options and the same "
                              "data (--data and --eval-data files with the same lines)")

    def fit(self, engine: Engine, callbacks=()) -> TrainResult:
        o, main = self.options, engine.rank == 0
        state = self.state or {"step": 0, "epoch": 0, "position": 0}
        step, epoch, position = state["step"], state["epoch"], state["position"]
        progress = [step, self.resume_from]  # (updates done, the last checkpoint) for a stop on a signal
        disarm = lambda: None  # noqa: E731 - (armed in multi-process runs below)
        if engine.world_size > 1:  # every process starts from the same update (each reads its own --out)
            steps = np.zeros(engine.world_size, np.int64)
            steps[engine.rank] = step
            steps = engine.all_sum(steps)
            if len(set(steps.tolist())) > 1:
                raise ConfigError(f"the processes start from different updates ({', '.join(map(str, steps))}, by "
                                  "rank): with --resume every process needs the newest checkpoint of the run in "
                                  "its --out (a shared folder, or a copy of rank 0's)")
            self.check_agreement(engine)
            keep_python_sigterm_handler()
            disarm = end_if_stuck_after_a_signal(lambda: interrupted_message(*progress) if main else "")
        if self.state:
            from .checkpoint_safetensors import open_safetensors

            stored = open_safetensors(os.path.join(self.resume_from, OPTIMIZER_NAME))
            tensors = {k: t.load() for k, t in stored.items()}
            engine.load_optimizer_tensors(tensors, self.state["optimizer"])
        total = self.total_steps(engine.world_size, step, epoch, position)
        if self.state and step > total:
            raise ConfigError(f"{self.resume_from} is at update {step}, past the {total} updates asked for "
                              "(--max-steps); give a larger --max-steps to train on")
        if self.state and step == total:  # a finished run asked to resume (a retried job): nothing to do
            engine.barrier()
            disarm()
            return TrainResult(o.out, os.path.join(o.out, ADAPTER_DIR if o.lora_rank else MODEL_DIR), step,
                               None, None, self.resume_from, engine.rank)
        if main:
            os.makedirs(o.out, exist_ok=True)
            changed, before = list(self.changed), (self.state or {}).get("global_batch")
            if before and before != self.global_batch(engine.world_size):
                changed.append(f"global batch {self.global_batch(engine.world_size)} (was {before})")
            if changed:
                logging.getLogger(__name__).warning(
                    "resuming %s with options that differ from those it was written with: %s", self.resume_from, "; ".join(changed))
            if o.max_length and o.max_length > self.config.max_position_embeddings:
                logging.getLogger(__name__).warning(
                    "--max-length %s is above the model's %d positions: examples are cut to %d tokens", o.max_length,
                    self.config.max_position_embeddings, self.max_length)
            if o.warmup and o.warmup >= total and o.lr:
                logging.getLogger(__name__).warning(
                    "--warmup %s is not below the run's %d updates: the learning rate never reaches --lr (update n "
                    "trains at lr * n / %s, the first at 0)", o.warmup, total, o.warmup)
        metrics = Metrics(o.out, main, total, step, o.progress)
        if main and not self.state and (self.data.bad_lines or (self.eval_data and self.eval_data.bad_lines)):
            metrics.log({"step": step, "skipped_bad_lines": self.data.bad_lines,
                         **({"skipped_bad_eval_lines": self.eval_data.bad_lines} if self.eval_data else {})})
        loss = eval_loss = None
        last_checkpoint = self.resume_from
        tokens_seen, window = 0, (0, time.perf_counter())  # tokens so far; (tokens, time) at the last log
        pending = None  # an update whose device values are read once the next one is queued

        def settle(update: dict) -> None:
            """Read an update's values (waiting for its device), log them when due, call the callbacks. Speed
            counts from the times updates were handed to the engine: in a steady run the device paces them."""
            nonlocal loss, window
            values = {k: float(v) for k, v in update["out"].items()}
            loss, at = values["loss"], update["step"]
            if not math.isfinite(loss):  # the same on every process: the loss is the global batch's
                metrics.log({"step": at, "epoch": update["epoch"], "loss": loss, "lr": update["lr"],
                             "time": update["time"]})
                kept = f"; {last_checkpoint} holds the last checkpoint" if last_checkpoint else ""
                raise TrainingError(f"training diverged: the loss of update {at} is {loss} (lr {update['lr']:.3g}); "
                                    f"nothing more was written{kept}. Try a lower --lr, a --warmup, "
                                    "--max-grad-norm, or fp32 precision")
            if at % o.log_every == 0 or at == total:
                speed = (update["tokens"] - window[0]) / max(update["clock"] - window[1], 1e-9)
                window = (update["tokens"], update["clock"])
                record = {"step": at, "epoch": update["epoch"], "loss": loss, "lr": update["lr"],
                          "grad_norm": values.get("grad_norm", float("nan")), "tokens_per_s": speed,
                          "time": update["time"]}
                metrics.log(record, postfix={"loss": f"{loss:.4f}", "tok/s": f"{speed:,.0f}",
                                             "lr": f"{update['lr']:.2e}"})
            for callback in callbacks:
                callback(at, {"lr": update["lr"], **values})

        loader = Loader(self, engine.world_size, engine.rank, total - step, epoch, position)
        try:
            while step < total:
                epoch, position, indices, micro = loader.next()
                local = [sum(int(counted(m["labels"]).sum()) for m in micro),
                         sum(int(m["attention_mask"].sum()) for m in micro)]
                label_tokens, input_tokens = (int(x) for x in engine.all_sum(np.asarray(local, dtype=np.int64)))
                lr = float(o.learning_rate(step, total))
                out = engine.train_step(micro, lr=lr, step=step, global_tokens=label_tokens)
                step, position = step + 1, position + len(indices)
                tokens_seen += label_tokens + input_tokens
                if pending is not None:  # the previous update, read while this one runs on the device
                    settle(pending)
                pending = {"step": step, "epoch": epoch, "lr": lr, "out": out, "tokens": tokens_seen,
                           "clock": time.perf_counter(), "time": time.time()}
                evaluate = bool(self.eval_data and o.eval_every and step % o.eval_every == 0 and step < total)
                save = bool(o.save_every and step % o.save_every == 0 and step < total)
                if callbacks or evaluate or save or step == total:
                    settle(pending)
                    pending = None
                if evaluate:
                    eval_loss = self.evaluate(engine, metrics, step)
                progress[0] = step
                if save:
                    last_checkpoint = progress[1] = self.save(engine, step, epoch, position, total)
            if self.eval_data:
                eval_loss = self.evaluate(engine, metrics, step)
            last_checkpoint = self.save(engine, step, epoch, position, total, final=True)
            disarm()  # (after a signal it stays armed: the process is going down)
        except KeyboardInterrupt:
            raise Interrupted(interrupted_message(step, last_checkpoint) if main else "") from None
        finally:
            loader.close()
            metrics.close()
            self.data.close()
        final = os.path.join(o.out, ADAPTER_DIR if o.lora_rank else MODEL_DIR)
        return TrainResult(out=o.out, model=final, steps=step, loss=loss, eval_loss=eval_loss, checkpoint=last_checkpoint,
                           rank=engine.rank, examples=len(self.data), skipped_lines=self.data.bad_lines,
                           skipped_eval_lines=self.eval_data.bad_lines if self.eval_data else 0)

    def evaluate(self, engine: Engine, metrics: Metrics, step: int) -> float:
        """Mean token loss over the evaluation data (file order, no dropout); logs it with its perplexity."""
        size = self.options.batch_size * engine.world_size
        loss_sum, count = 0.0, 0
        order = np.arange(len(self.eval_data))
        for start in range(0, len(order), size):
            (batch,) = self.micro_batches(self.eval_data, order[start:start + size], 1, engine.world_size,
                                          engine.rank)
            s, n = engine.eval_step(batch)
            loss_sum, count = loss_sum + s, count + n
        loss = loss_sum / max(count, 1)
        metrics.log({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))})
        return loss

    # ------------------------------------------------------------------ saving
    def save(self, engine: Engine, step: int, epoch: int, position: int, total: int, final: bool = False) -> str:
        """checkpoint-N (every process takes part in gathering; rank 0 writes), and at the end the model in DIR."""
        o = self.options
        target = os.path.join(o.out, f"{CHECKPOINT_PREFIX}{step}")
        adapters = engine.adapter_tensors() if o.lora_rank else None
        model = None if o.lora_rank else engine.model_tensors()
        opt = engine.optimizer_tensors()
        merged = engine.model_tensors() if final and o.merge else None
        if engine.rank == 0:
            tensors, meta = opt
            state = {"step": step, "epoch": epoch, "position": position, "total_steps": total,
                     "world_size": engine.world_size, "global_batch": self.global_batch(engine.world_size),
                     "optimizer": meta, "options": o.to_dict()}

            def fill(folder):
                self._write_model(folder, engine.framework, model, adapters)
                _write_tensors(os.path.join(folder, OPTIMIZER_NAME), tensors)
                atomic_write_text(os.path.join(folder, STATE_NAME), json.dumps(state, indent=2) + "\n")

            write_folder(target, fill)
            if o.keep_checkpoints:
                for old in list_checkpoints(o.out)[:-o.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            if final:
                write_folder(os.path.join(o.out, ADAPTER_DIR if o.lora_rank else MODEL_DIR),
                             lambda f: self._write_model(f, engine.framework, model, adapters))
                if merged is not None:
                    write_folder(os.path.join(o.out, MERGED_DIR),
                                 lambda f: self._write_model(f, engine.framework, merged, None))
        engine.barrier()
        return target

    def _write_model(self, folder: str, framework: str, model, adapters) -> None:
        from .checkpoint import save_pretrained

        if adapters is not None:
            lora.save_adapters(folder, adapters, rank=self.options.lora_rank,
                               alpha=self.options.lora_alpha or self.options.lora_rank,
                               targets=lora.target_names(self.options.lora_ffn),
                               base_model=_model_reference(self.options.model),
                               dropout=self.options.lora_dropout)
        else:
            save_pretrained(folder, self.config, model, framework=framework, generation_config=self.generation_config)
        self.tokenizer.save_pretrained(folder)


def _model_reference(model: str | None) -> str | None:
    """A local model folder as an absolute path (an adapter's base is found from any working folder); a hub id
    as it is."""
    return os.path.abspath(model) if model and os.path.isdir(model) else model


def micro_batches(data: TrainingData, tokenizer, max_length: int, batch_size: int, indices: np.ndarray, accum: int,
                  world_size: int, rank: int) -> list[dict[str, np.ndarray]]:
    """Process `rank`'s `accum` micro-batches of one global batch (micro-batch j of process r holds rows
    (j * world_size + r) * batch_size onwards); missing rows at the end of the data are filled with copies
    whose labels are all ignored, so every process runs the same number of equal-sized steps."""
    b, real = batch_size, len(indices)
    size = b * accum * world_size
    indices = np.concatenate([indices, np.full(size - real, indices[0], dtype=indices.dtype)])
    out = []
    for j in range(accum):
        start = (j * world_size + rank) * b
        rows = indices[start:start + b]
        batch = encode_examples(tokenizer, [data[int(i)] for i in rows], max_length)
        batch["labels"][np.arange(start, start + b) >= real] = -100
        out.append(batch)
    return out


_WORKER: dict = {}  # a loader process's data, tokenizer and sizes


def _worker_start(data: TrainingData, tokenizer, max_length: int, batch_size: int) -> None:
    _WORKER.update(data=data, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)


def _worker_encode(indices: np.ndarray, accum: int, world_size: int, rank: int) -> list[dict[str, np.ndarray]]:
    w = _WORKER
    return micro_batches(w["data"], w["tokenizer"], w["max_length"], w["batch_size"], indices, accum, world_size,
                         rank)


class Loader:
    """The global batches of a run, read and encoded ahead of the updates that use them: on one thread
    (`loader_workers` 0; the tokenizer releases the GIL, the rest of the encoding holds it), or on that many
    spawned processes, several batches ahead, so the training process spends no time on text."""

    def __init__(self, run: Run, world_size: int, rank: int, count: int, epoch: int, position: int):
        o = run.options
        self.plan = itertools.islice(run.schedule(epoch, position, world_size), count)
        self.args = (o.grad_accum, world_size, rank)
        if o.loader_workers:
            import multiprocessing

            self.pool = ProcessPoolExecutor(o.loader_workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_start,
                                            initargs=(run.data, run.tokenizer, run.max_length, o.batch_size))
            self.encode, self.depth = _worker_encode, 2 * o.loader_workers
        else:
            self.pool = ThreadPoolExecutor(max_workers=1)
            self.encode = functools.partial(run.micro_batches, run.data)
            self.depth = 1
        self.queue: collections.deque = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.queue) < self.depth:
            item = next(self.plan, None)
            if item is None:
                return
            self.queue.append((*item, self.pool.submit(self.encode, item[2], *self.args)))

    def next(self) -> tuple[int, int, np.ndarray, list[dict[str, np.ndarray]]]:
        """(epoch, position, indices, this process's micro-batches) of the next global batch."""
        epoch, position, indices, future = self.queue.popleft()
        self._fill()
        return epoch, position, indices, future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_tensors(path: str, tensors: dict) -> None:
    """A safetensors file of named tensors (numpy arrays or framework tensors)."""
    from .checkpoint_safetensors import write_safetensors_file
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        write_safetensors_file(tmp, dict(tensors))


def train_with(engine_class, default_backend: str, options: TrainingOptions | None = None, callbacks=(),
               **kwargs) -> TrainResult:
    """A backend's `train(...)`: the options (keyword arguments, `backend` defaulting to this one), the run,
    `engine_class(run)`, and `Run.fit`."""
    if options is None:
        options = TrainingOptions(**{"backend": default_backend, **kwargs})
    run = prepare_run(options)
    engine = engine_class(run)
    try:
        return run.fit(engine, callbacks=callbacks)
    finally:
        engine.close()


def prepare_run(options: TrainingOptions | None = None, **kwargs) -> Run:
    """Check the options and the data, find the resume point, settle tokenizer and config (no framework)."""
    if options is not None and kwargs:
        raise InputError("pass either a TrainingOptions or keyword options, not both")
    return Run(options or TrainingOptions(**kwargs))


__all__ = ["Engine", "Run", "TrainResult", "prepare_run", "train_with", "latest_checkpoint", "list_checkpoints", "read_state"]


def _option(name: str, value) -> str:
    """A training option as the command line writes it: `--lora-rank 4`, `no --lora-rank`."""
    flag = "--" + name.replace("_", "-")
    return f"no {flag}" if value is None or value is False else flag if value is True else f"{flag} {value}"
