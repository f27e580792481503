"""Training for the PyTorch backend: `train(...)` (the `blenderbot-mb train` command), its engine, and small
helpers for hand-written loops.

    >>> from blenderbot_mb.torch.training import train
    >>> train(data="dialogues.jsonl", out="run/", model="facebook/blenderbot-400M-distill", max_steps=1000)

Under `torchrun --nproc-per-node N` the same call trains with DistributedDataParallel (NCCL on GPUs, gloo
on CPUs); `fsdp=True` shards parameters, gradients and optimizer state with FSDP2 (`fully_shard` on every
layer and the root). Checkpoints are gathered into full HF-layout files on rank 0, and a run resumes at any
process count. Mixed precision: bf16 (autocast; FSDP2 computes in bf16 and reduces in fp32) or fp16 (autocast
with a gradient scaler); master weights stay fp32. The loop, data, schedule and file layout are the core's
(`blenderbot_mb.trainer`); this file holds the PyTorch pieces.

Speed. An update waits for the GPU nowhere: batches are checked on the host and copied from pinned memory
without blocking, clipping scales the gradients by a device-side factor, the loss and the gradient norm come
back as device tensors (the loop reads them when it logs), and the token counts of a global batch are summed
over processes on a CPU (gloo) group beside NCCL. On CUDA, AdamW is the fused kernel and DDP reduces straight
from the gradients' buckets; `compile=True` compiles every encoder and decoder layer with `torch.compile`
(identical layers share one compiled graph), `compile="model"` the whole model, and `cuda_graphs=True`
replays the whole update as one CUDA graph (`GraphedUpdate`; with compile, of the compiled kernels: they
compile in the eager updates before the capture). Without padding in a batch the encoder gets no mask, and the
decoder's self-attention is causal without a mask tensor, so SDPA picks its flash kernels.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import lora as lora_files
from .. import validation
from ..data import encode_pairs, pad_batch
from ..errors import ConfigError, InputError
from ..trainer import Run, TrainResult, train_with
from ..training import ADAM_BETAS, ADAM_EPS, IGNORE_INDEX, TrainingOptions, decays, step_seed
from . import lora
from .modeling import BlenderbotForConditionalGeneration, check_values, shift_tokens_right

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------- pieces
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of token cross-entropies over the labels that count (blenderbot_mb.training), in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def enable_gradient_checkpointing(model) -> None:
    """Recompute every encoder and decoder layer in the backward pass (the model's
    `gradient_checkpointing_enable()`: torch.utils.checkpoint, non-reentrant; dropout masks are replayed
    exactly)."""
    model.gradient_checkpointing_enable()


DIST_TIMEOUT_ENV = "BLENDERBOT_MB_DIST_TIMEOUT"


def distributed_timeout() -> float:
    """Seconds a process waits for the others, to connect or at a collective, before it fails with an error:
    $BLENDERBOT_MB_DIST_TIMEOUT, else 600 (PyTorch's own is 30 minutes: a peer that died at startup left the
    others waiting silently that long)."""
    value = os.environ.get(DIST_TIMEOUT_ENV, "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{DIST_TIMEOUT_ENV} must be a positive number of seconds, not {value!r}")
    return seconds


def init_distributed(device: str | None = None) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, whether this call started the process group), from torchrun's variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # an unknown or absent device fails here, by name
    except (RuntimeError, AssertionError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--device {device}: not available here ({reason})") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None, timeout=datetime.timedelta(seconds=distributed_timeout()))
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, (dist.get_world_size() if dist.is_initialized() else 1), started


def _state_dict_api():
    """torch.distributed.checkpoint's state-dict functions, imported by the runs that save or resume (it takes
    ~0.8 s, which `import blenderbot_mb.torch` and a reply should not pay)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


class TorchEngine:
    """The PyTorch pieces of `blenderbot_mb.trainer.Engine`: model, optimizer, one update, state I/O."""

    framework = "pt"

    def __init__(self, run: Run):
        o = self.options = run.options
        self.run = run
        self.device, self.rank, self.world_size, self._started = init_distributed(o.device)
        if o.fsdp and o.precision == "fp16":
            raise ConfigError("--fsdp trains in fp32 or bf16; fp16 needs a gradient scaler FSDP2 does not shard")
        if o.cuda_graphs:
            check_cuda_graphs(o, self.device)
        torch.manual_seed(o.seed)
        if run.model_folder is None:
            model = BlenderbotForConditionalGeneration(run.config)
            model.generation_config = run.generation_config
        else:
            model = BlenderbotForConditionalGeneration.from_pretrained(run.model_folder)
        if o.lora_rank:
            lora.add_lora(model, o.lora_rank, o.lora_alpha, ffn=o.lora_ffn, dropout=o.lora_dropout, seed=o.seed)
            if run.adapter_folder:
                lora.load_adapters(model, lora_files.read_adapters(run.adapter_folder)[0])
        if o.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        check_values(model, False)  # batches are checked on the host (_to_device): no device reads in forward
        self.model = model.to(self.device).train()
        self.graphed = None
        if o.cuda_graphs:
            length = min(o.max_length or run.config.max_position_embeddings, run.config.max_position_embeddings)
            self.graphed = GraphedUpdate(self, rows=o.batch_size, source_length=length, target_length=length)
        if o.compile in (True, "layers"):
            for layer in [*model.get_encoder().layers, *model.get_decoder().layers]:
                layer.compile()
        self.autocast = DTYPES[o.precision]
        self.wrapped = self.ddp = self.model  # the module a step calls, and the one whose no_sync() skips a sync
        self.sharded = o.fsdp and self.world_size > 1  # one process has nothing to shard over: it trains unsharded
        cuda = self.device.type == "cuda"
        if self.sharded:
            self._shard()
        elif self.world_size > 1:
            side = torch.cuda.stream(torch.cuda.Stream()) if self.graphed else contextlib.nullcontext()
            with side, warnings.catch_warnings():  # CUDA graphs: DDP is built on a side stream (whole-network capture)
                # PyTorch 2.13 calls broadcast_buffers deprecated but asks to keep broadcast_buffers=False until its
                # replacement is there: no warning for the user to act on
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated")
                # under a CUDA graph, 100 MB gradient buckets (DDP's default: 25) cost no host time and took 38.5
                # against 39.2 ms per update on two GPUs (docs/benchmarks.md)
                self.wrapped = torch.nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if cuda else None, gradient_as_bucket_view=True,
                    broadcast_buffers=False,  # the one buffer, final_logits_bias, never changes
                    bucket_cap_mb=100 if self.graphed else None)
            self.ddp = self.wrapped
            if self.graphed:
                torch.cuda.current_stream().wait_stream(side.stream)
        if o.compile == "model":  # under DDP, dynamo's DDPOptimizer splits the graph at the gradient buckets
            self.wrapped = torch.compile(self.wrapped, fullgraph=self.wrapped is self.model, dynamic=None)
        # host values (token counts, eval sums) are summed on a CPU group: no copy to and from the GPU
        self.host_group = dist.new_group(backend="gloo") if self.world_size > 1 and cuda else None
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": o.weight_decay},
                  {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.graphed.lr if self.graphed else o.lr, betas=ADAM_BETAS,
                                           eps=ADAM_EPS, fused=cuda or None, capturable=bool(self.graphed))
        self.scaler = torch.amp.GradScaler(self.device.type) if o.precision == "fp16" else None

    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.autocast, reduce_dtype=torch.float32)
        for layer in [*self.model.get_encoder().layers, *self.model.get_decoder().layers]:
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)
        self.autocast = None  # FSDP2 casts parameters itself

    # ------------------------------------------------------------------ collectives
    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return values
        t = torch.as_tensor(values)
        dist.all_reduce(t, group=self.host_group)
        return t.numpy()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self._started:
            dist.destroy_process_group()

    # ------------------------------------------------------------------ steps
    def _autocast(self, cache: bool = True):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=cache)

    def check(self, batch: dict[str, np.ndarray]) -> None:
        """Token ids and mask checked on the host: the model then reads no values on the device."""
        c = self.model.config
        labels = batch["labels"]
        for name, ids in (("input_ids", batch["input_ids"]), ("labels", np.where(labels == IGNORE_INDEX, 0, labels))):
            validation.check_input_ids(ids, c.vocab_size, c.max_position_embeddings, name)
        validation.check_attention_mask(batch["attention_mask"], batch["input_ids"].shape)

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | None]:
        """A micro-batch checked on the host, decoder inputs made from the labels, copied from pinned memory
        without blocking; no mask when nothing is padded."""
        c = self.model.config
        self.check(batch)
        host = {k: torch.from_numpy(v) for k, v in batch.items()}
        host["decoder_input_ids"] = shift_tokens_right(host["labels"], c.pad_token_id, c.decoder_start_token_id)
        if batch["attention_mask"].all():
            del host["attention_mask"]
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in host.items()}
        return host

    def _loss_sum(self, batch: dict, label_smoothing: float) -> torch.Tensor:
        with self._autocast():
            logits = self.wrapped(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  decoder_input_ids=batch["decoder_input_ids"], use_cache=False,
                                  return_dict=True).logits
        return token_loss_sum(logits, batch["labels"], label_smoothing)

    def _sync(self, last: bool):
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.ddp is not self.model and not last:  # DDP's, also under torch.compile (not the compiled module's)
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches, *, lr: float, step: int, global_tokens: int) -> dict:
        if self.graphed:
            return self.graphed(micro_batches, lr=lr, step=step, global_tokens=global_tokens)
        o = self.options
        torch.manual_seed(step_seed(o.seed, step, self.rank))  # dropout (CPU and CUDA generators)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.wrapped.train()
        scale = self.world_size / max(global_tokens, 1)  # DDP/FSDP average over processes: sum / global count
        loss_sum = torch.zeros((), device=self.device)
        for j, batch in enumerate([self._to_device(b) for b in micro_batches]):
            with self._sync(j == len(micro_batches) - 1):
                s = self._loss_sum(batch, o.label_smoothing)
                loss = s * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += s.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self._clip(o.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:
            dist.all_reduce(loss_sum)  # queued on the device (NCCL), read when the loop logs
        return {"loss": loss_sum / max(global_tokens, 1), "grad_norm": norm}

    def _clip(self, max_norm: float | None) -> torch.Tensor:
        """Global L2 norm of the gradients (a device tensor); when above max_norm every gradient is multiplied
        by max_norm / norm (training rule), as min(max_norm / norm, 1) computed on the device: exactly 1 below."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # FSDP2: a DTensor over the shards
        if max_norm:
            torch._foreach_mul_(grads, torch.clamp(max_norm / norm, max=1.0))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def eval_step(self, batch) -> tuple[float, int]:
        self.wrapped.eval()
        s = self._loss_sum(self._to_device(batch), 0.0)
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        total = self.all_sum(np.array([float(s), count], dtype=np.float64))
        return float(total[0]), int(total[1])

    # ------------------------------------------------------------------ state
    def _full_state(self) -> dict:
        if self.sharded:
            dcp = _state_dict_api()
            return dcp.get_model_state_dict(self.model,
                                            options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict() if self.rank == 0 else {}

    def model_tensors(self):
        from ..naming import tensor_names

        state = self._full_state()
        if self.rank != 0:
            return None
        state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
        for name in lora.lora_modules(self.model):  # fold adapters in (FSDP: from the gathered full state)
            a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float() + self.options.lora_scaling * (b @ a)).to(w.dtype)
        return {n: state[n].detach().cpu().contiguous() for n in tensor_names(self.model.config, self.model.architecture)}

    def adapter_tensors(self):
        state = self._full_state()
        if self.rank != 0:
            return None
        out = {}
        for name in lora.lora_modules(self.model):
            key_a, key_b = lora_files.adapter_keys(name)
            out[key_a] = state[f"{name}.lora_A.weight"].detach().cpu().contiguous()
            out[key_b] = state[f"{name}.lora_B.weight"].detach().cpu().contiguous()
        return out

    def optimizer_tensors(self):
        dcp = _state_dict_api()
        full = dcp.get_optimizer_state_dict(self.model, self.optimizer,
                                            options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        tensors = {f"{fqn}::{key}": torch.as_tensor(v).detach().cpu().contiguous()
                   for fqn, entry in full["state"].items() for key, v in entry.items()}
        meta = {"param_groups": [{k: list(v) if isinstance(v, tuple) else float(v) if torch.is_tensor(v) else v
                                  for k, v in g.items()} for g in full["param_groups"]],
                "scaler": {k: (float(v) if torch.is_tensor(v) else v) for k, v in self.scaler.state_dict().items()}
                if self.scaler else None}
        return tensors, meta

    def load_optimizer_tensors(self, tensors, meta) -> None:
        state: dict = {}
        for key, value in tensors.items():
            fqn, _, name = key.rpartition("::")
            state.setdefault(fqn, {})[name] = torch.from_numpy(np.array(value))
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
        dcp = _state_dict_api()
        dcp.set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                     options=dcp.StateDictOptions(full_state_dict=True))
        if self.graphed:  # before the first update: graphs are captured then, reading this state by address
            for group in self.optimizer.param_groups:
                group.update(lr=self.graphed.lr, capturable=True)
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])


def check_cuda_graphs(options: TrainingOptions, device: torch.device) -> None:
    """A clear error where the update cannot be one CUDA graph."""
    problems = [
        (device.type != "cuda", f"needs a CUDA device (this run is on {device.type})"),
        (options.fsdp, "works with one process or DDP, not --fsdp (FSDP2 gathers and frees weights from the host)"),
        (options.precision == "fp16", "trains in fp32 or bf16: fp16's gradient scaler reads overflows on the host"),
        (options.gradient_checkpointing, "is not supported with --gradient-checkpointing"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"--cuda-graphs {message}")


class GraphedUpdate:
    """The whole update (forward and backward of every micro-batch, clipping, AdamW, the loss all-reduce)
    captured once as a CUDA graph and replayed: one launch per update instead of thousands, so the host no
    longer paces the GPU, and under DDP the gradient all-reduce overlaps a backward pass the GPU paces.

    PyTorch's whole-network capture: shapes are static, so every micro-batch is padded to rows x source
    length + target length (`blenderbot_mb.data.pad_batch`: the same loss sum and token count) and copied
    into device buffers, one copy per update from pinned host buffers used in turn; the learning rate and
    the loss scale are device tensors (AdamW fused and capturable). The first updates run eagerly on a side
    stream (lazy initialization; DDP's first 11 iterations do host bookkeeping), then the update is captured
    and replayed from then on. A batch with padding needs the encoder mask: the first one captures a second
    graph (its own memory), which then takes every batch. Dropout draws from the default CUDA generator,
    which PyTorch registers with the graph: each replay reads the seed set before it (`step_seed`).
    `capture=False` runs the same update eagerly every time (the CPU tests' view of it)."""

    def __init__(self, engine: TorchEngine, rows: int, source_length: int, target_length: int,
                 capture: bool = True):
        self.engine, self.capture, self.rows = engine, capture, rows
        self.lengths = (source_length, target_length)
        accum, cuda = engine.options.grad_accum, engine.device.type == "cuda"
        names = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
        shapes = [(accum, rows, n) for n in (source_length, source_length, target_length, target_length)]
        size = sum(int(np.prod(shape)) for shape in shapes)

        def views(flat: torch.Tensor) -> dict[str, torch.Tensor]:  # name -> [accum, rows, length]
            parts = flat.split([int(np.prod(shape)) for shape in shapes])
            return {name: part.view(shape) for name, part, shape in zip(names, parts, shapes, strict=True)}

        # [ints, floats (loss scale, lr)] on the host, twice: one is filled while the other's copy may be queued
        self.host = [(torch.empty(size, dtype=torch.int64, pin_memory=cuda),
                      torch.empty(2, dtype=torch.float32, pin_memory=cuda)) for _ in range(2)]
        self.host_views = [views(ints) for ints, _ in self.host]
        self.copied = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self.ints = torch.zeros(size, dtype=torch.int64, device=engine.device)
        self.floats = torch.ones(2, dtype=torch.float32, device=engine.device)
        self.inputs, self.scale, self.lr = views(self.ints), self.floats[0], self.floats[1]
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # encoder mask or not -> graph
        self.outputs: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eager_left = 11 if engine.world_size > 1 else 3
        self.side = torch.cuda.Stream(engine.device) if cuda else None

    def __call__(self, micro_batches, *, lr: float, step: int, global_tokens: int) -> dict:
        e = self.engine
        c = e.model.config
        if len(micro_batches) != len(self.inputs["labels"]):
            raise ValueError(f"the graphed update takes {len(self.inputs['labels'])} micro-batches "
                             f"(grad_accum), got {len(micro_batches)}")
        turn = step % 2
        if self.copied:
            self.copied[turn].synchronize()  # this buffer's previous copy has left
        ints, floats = self.host[turn]
        host = self.host_views[turn]
        mask = True in self.graphs  # the graph with the mask takes every batch once it exists
        for j, batch in enumerate(micro_batches):
            e.check(batch)
            padded = pad_batch(batch, self.rows, *self.lengths, pad_token_id=c.pad_token_id)
            mask = mask or not padded["attention_mask"].all()
            for name, value in padded.items():
                host[name][j] = torch.from_numpy(value)
            host["decoder_input_ids"][j] = shift_tokens_right(host["labels"][j], c.pad_token_id,
                                                              c.decoder_start_token_id)
        floats[0], floats[1] = e.world_size / max(global_tokens, 1), lr  # DDP averages: sum / global count
        self.ints.copy_(ints, non_blocking=True)
        self.floats.copy_(floats, non_blocking=True)
        if self.copied:
            self.copied[turn].record()
        torch.manual_seed(step_seed(e.options.seed, step, e.rank))  # dropout (CPU and CUDA generators)
        if mask in self.graphs:
            self.graphs[mask].replay()
            loss_sum, norm = self.outputs[mask]
        elif not self.capture or self.eager_left > 0:
            loss_sum, norm = self._eager(mask, lr)
            self.eager_left -= 1
        else:
            loss_sum, norm = self._capture(mask)
        # the graph's outputs are overwritten by the next replay: the loop reads copies
        return {"loss": loss_sum / max(global_tokens, 1), "grad_norm": norm.clone()}

    def _update(self, mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The update on the device buffers: (loss sum over all processes, gradient norm)."""
        e, o, x = self.engine, self.engine.options, self.inputs
        loss_sum = None
        for j in range(len(x["labels"])):
            with e._sync(j == len(x["labels"]) - 1):
                with e._autocast(cache=False):  # autocast's weight cache does not survive capture
                    logits = e.wrapped(input_ids=x["input_ids"][j], attention_mask=x["attention_mask"][j] if mask
                                       else None, decoder_input_ids=x["decoder_input_ids"][j], use_cache=False,
                                       return_dict=True).logits
                s = token_loss_sum(logits, x["labels"][j], o.label_smoothing)
                (s * self.scale).backward()
            loss_sum = s.detach() if loss_sum is None else loss_sum + s.detach()
        norm = e._clip(o.max_grad_norm)
        e.optimizer.step()
        if e.world_size > 1:
            dist.all_reduce(loss_sum)
        return loss_sum, norm

    def _eager(self, mask: bool, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.capture:  # the optimizer was built with a float lr
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
        # after a replay the gradients are the graph's own tensors, holding its last update: start from none
        self.engine.optimizer.zero_grad(set_to_none=True)
        if self.side is None:
            out = self._update(mask)
            self.engine.optimizer.zero_grad(set_to_none=True)
            return out
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss_sum, norm = self._update(mask)
            self.engine.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss_sum.clone(), norm.clone()

    def _capture(self, mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs[mask] = self._update(mask)
        self.graphs[mask] = graph
        self.eager_left = 1  # a second graph (with the mask) warms up its kernels once
        graph.replay()
        return self.outputs[mask]


def train(options: TrainingOptions | None = None, callbacks=(), **kwargs) -> TrainResult:
    """Train (or fine-tune) a model: `blenderbot-mb train` as a function; keyword arguments are the fields of
    `blenderbot_mb.training.TrainingOptions`. `callbacks`: functions called as f(step, metrics) after every
    update. Returns the run's TrainResult (steps, last loss, eval loss, last checkpoint)."""
    return train_with(TorchEngine, "torch", options, callbacks, **kwargs)


# ---------------------------------------------------------------------- helpers for hand-written loops
def train_step(model, batch: dict, optimizer, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step on `batch` (input_ids, attention_mask, labels with -100 for ignored positions)."""
    if not isinstance(batch, Mapping):
        raise InputError(f"train_step takes a batch as a dict (input_ids, attention_mask, labels), got "
                         f"{type(batch).__name__}")
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
    """Fine-tune on (context, reply) text pairs with AdamW in this process; returns the loss of every step.
    Leaves the model in eval mode. (For files, schedules, checkpoints and several GPUs, use `train`.)"""
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
