"""Where an update of the PyTorch engine spends its time under DDP, per process, as a few JSON lines.

    torchrun --nproc-per-node 1 benchmarks/ddp_breakdown.py            # the same breakdown without DDP
    torchrun --nproc-per-node 2 benchmarks/ddp_breakdown.py            # DDP (NCCL) and its variants

Placement (per process): LOCAL_RANK, CUDA_VISIBLE_DEVICES, torch.cuda.current_device(), the device of the
model's parameters, the GPU's PCI bus id and the memory this process holds; after warmup, process 0 prints
nvidia-smi's per-GPU process list, memory and utilization and `nvidia-smi topo -m` (NVLink or PCIe between
the GPUs), whether this GPU can access the others' memory (P2P); with 2 processes: NCCL all-reduce time and bus
bandwidth on a buffer the size of the gradients.

Variants (`--variants`), each a fresh TorchEngine (400M-distill shape, bf16, `--batch-size` rows of 128+128
tokens per GPU, random batches checked and copied by the engine as in benchmark_train.py's `ours`):
- ddp: the engine as it is (gradient_as_bucket_view, no buffer broadcasts, 25 MB buckets);
- no-grad-sync: DDP's no_sync() on every update (no gradient all-reduce): the compute alone, on 2 GPUs;
- bf16-grads: gradients all-reduced in bfloat16 (DDP's bf16_compress_hook): half the bytes on the wire;
- no-bucket-view, bucket-100mb, static-graph: DDP built with gradient_as_bucket_view=False,
  bucket_cap_mb=100, static_graph=True;
- no-loss-reduce: without the loss all-reduce at the end of the update;
- host-sync: torch.cuda.synchronize() after every update (the loop before it stopped reading the loss);
- host-sum: the training loop's per-update sum of token counts on the CPU (gloo) group before the update.
Each variant runs `--warmup` updates (DDP waits for the GPU at the start of its forward in its 2nd to 11th
iteration, where it collects its runtime statistics: warmup 12 leaves those out), then `--steps` updates, timed
in two ways: wall ms per update (one synchronize at the end) and, on CUDA events of the compute stream, the
phases of each update: forward (with the batch copy), backward (DDP's all-reduce wait included: the compute
stream waits for the last bucket), clip, optimizer (step, zero_grad, loss all-reduce); host_ms is the time
train_step takes to return (the CPU's share: when it is near the wall time, the update is bound by the CPU).
`ddp-syncing-iterations` times updates 2-11 of a fresh engine (DDP's statistics iterations) against 12-21.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import time
import types

import numpy as np
import torch
import torch.distributed as dist
from benchmark_train import load_shape, our_engine, synthetic_batch

VARIANTS = ("ddp", "no-grad-sync", "bf16-grads", "no-bucket-view", "bucket-100mb", "static-graph", "no-loss-reduce",
            "host-sync", "host-sum", "ddp-syncing-iterations")
DDP_KWARGS = {"no-bucket-view": {"gradient_as_bucket_view": False}, "bucket-100mb": {"bucket_cap_mb": 100},
              "static-graph": {"static_graph": True}}


def emit(record: dict, rank: int, everyone: bool = False) -> None:
    if everyone or rank == 0:
        print(json.dumps({"rank": rank, **record}), flush=True)


def shell(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def placement(engine, rank: int) -> None:
    cuda = engine.device.type == "cuda"
    index = torch.cuda.current_device() if cuda else None
    emit({"placement": {
        "pid": os.getpid(), "local_rank": os.environ.get("LOCAL_RANK"), "world": engine.world_size,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "engine_device": str(engine.device),
        "current_device": index, "param_devices": sorted({str(p.device) for p in engine.model.parameters()}),
        "pci_bus_id": torch.cuda.get_device_properties(index).pci_bus_id if cuda else None,
        "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else 0.0,
        "wrapped": type(engine.wrapped).__name__, "omp_threads": torch.get_num_threads(),
        "peer_access": {i: torch.cuda.can_device_access_peer(index, i) for i in range(torch.cuda.device_count())
                        if i != index} if cuda else None,
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}}, rank, everyone=True)


def nvidia_smi(rank: int) -> None:
    if rank != 0:
        return
    apps = shell(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id,used_memory", "--format=csv,noheader"])
    gpus = shell(["nvidia-smi", "--query-gpu=index,pci.bus_id,memory.used,utilization.gpu", "--format=csv,noheader"])
    topo = shell(["nvidia-smi", "topo", "-m"])
    emit({"nvidia_smi": {"apps": apps.splitlines(), "gpus": gpus.splitlines(),
                         "topo": [line.rstrip() for line in topo.splitlines()[:4]]}}, rank)


def nccl_bandwidth(engine, rank: int, world: int) -> None:
    """All-reduce of one fp32 buffer as large as all gradients together (what DDP reduces per update)."""
    if world == 1 or engine.device.type != "cuda":
        return
    numel = sum(p.numel() for p in engine.params)
    buffer = torch.ones(numel, device=engine.device)
    for _ in range(2):
        dist.all_reduce(buffer)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(buffer)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    gb = numel * 4 / 1e9
    emit({"nccl_all_reduce": {"gb": round(gb, 3), "ms": round(seconds * 1e3, 2),
                              "bus_gb_per_s": round(gb * 2 * (world - 1) / world / seconds, 1)}}, rank)
    del buffer


class Phases:
    """CUDA events on the compute stream at the phase boundaries of every update (read after a sync)."""

    def __init__(self, engine):
        self.marks: list[list[tuple[str, torch.cuda.Event]]] = []
        loss_sum, clip = engine._loss_sum, engine._clip

        def timed_loss(*a, **k):
            out = loss_sum(*a, **k)
            self.mark("forward")
            return out

        def timed_clip(*a, **k):
            self.mark("backward")
            out = clip(*a, **k)
            self.mark("clip")
            return out

        engine._loss_sum, engine._clip = timed_loss, timed_clip

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks[-1].append((name, event))

    def start(self) -> None:
        self.marks.append([])
        self.mark("start")

    def summary(self) -> dict:
        torch.cuda.synchronize()
        phases: dict[str, list[float]] = {}
        for marks in self.marks:
            for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
                phases.setdefault(name, []).append(a.elapsed_time(b))
        return {f"{name}_ms": round(float(np.median(v)), 2) for name, v in phases.items()}


def variant_engine(name: str, config, batch_size: int):
    """A TorchEngine whose DDP wrapper takes the variant's keyword arguments."""
    ddp = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = lambda module, **kw: ddp(module, **{**kw, **DDP_KWARGS.get(name, {})})
    try:
        engine = our_engine(config, precision="bf16", batch_size=batch_size, lr=1e-5)
    finally:
        torch.nn.parallel.DistributedDataParallel = ddp
    if name == "no-grad-sync" and engine.wrapped is not engine.model:
        engine._sync = lambda last: engine.wrapped.no_sync()
    if name == "bf16-grads" and engine.wrapped is not engine.model:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        engine.wrapped.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return engine


@contextlib.contextmanager
def without_loss_reduce(enabled: bool):
    from blenderbot_mb.torch import training

    if not enabled:
        yield
        return
    real = training.dist
    training.dist = types.SimpleNamespace(all_reduce=lambda *a, **k: None)
    try:
        yield
    finally:
        training.dist = real


def run_variant(name: str, args, config, batch, rank: int, world: int, first: bool) -> None:
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    engine = variant_engine(name, config, args.batch_size)
    tokens = args.length * args.batch_size * world
    phases = Phases(engine) if cuda else None
    count = [0]

    def step():
        if name == "host-sum":
            engine.all_sum(np.array([tokens, tokens], dtype=np.int64))
        if phases:
            phases.start()
        start = time.perf_counter()
        engine.train_step([batch], lr=1e-5, step=count[0], global_tokens=tokens)
        host = time.perf_counter() - start
        if phases:
            phases.mark("optimizer")
        if name == "host-sync":
            sync()
        count[0] += 1
        return host

    with without_loss_reduce(name == "no-loss-reduce"):
        if name == "ddp-syncing-iterations":  # DDP's statistics iterations (2-11) against the next ten
            step()
            sync()
            walls = []
            for _ in range(2):
                start = time.perf_counter()
                for _ in range(10):
                    step()
                sync()
                walls.append((time.perf_counter() - start) / 10 * 1e3)
            emit({"variant": name, "ms_iterations_2_to_11": round(walls[0], 2),
                  "ms_iterations_12_to_21": round(walls[1], 2)}, rank, everyone=True)
        else:
            for _ in range(args.warmup):
                step()
            sync()
            if first:
                placement(engine, rank)
                nvidia_smi(rank)
                nccl_bandwidth(engine, rank, world)
            if phases:
                phases.marks.clear()
            hosts = []
            start = time.perf_counter()
            for _ in range(args.steps):
                hosts.append(step())
            sync()
            wall = (time.perf_counter() - start) / args.steps
            record = {"variant": name, "gpus": world, "ms_per_update": round(wall * 1e3, 2),
                      "tokens_per_s": round(2 * tokens / wall), "host_ms": round(float(np.median(hosts)) * 1e3, 2)}
            emit({**record, **(phases.summary() if phases else {})}, rank, everyone=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="blenderbot-400M-distill", help="a preset name or a config.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per GPU")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from blenderbot_mb.torch.training import init_distributed

    _, rank, world, _ = init_distributed()
    config = load_shape(args.shape)
    batch = synthetic_batch(config, args.batch_size, args.length, seed=rank)
    names = args.variants.split(",")
    if world == 1:  # one process has no DDP: the variants that change DDP change nothing
        names = [n for n in names if n in ("ddp", "host-sync")]
    for i, name in enumerate(names):
        start = time.perf_counter()
        try:
            run_variant(name, args, config, batch, rank, world, first=i == 0)
        except Exception as e:  # one failing variant must not hide the others' numbers
            emit({"variant": name, "error": f"{type(e).__name__}: {e}"[:500]}, rank, everyone=True)
        gc.collect()  # the variant's engine (its timing wrappers hold it in a cycle)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[{time.strftime('%H:%M:%S')}] rank {rank}: {name} took {time.perf_counter() - start:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
