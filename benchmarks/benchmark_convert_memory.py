"""Peak memory of `convert`: does a conversion stream tensor by tensor, or hold the model twice?

Writes a random checkpoint of a preset's shape (safetensors, written tensor by tensor, so generating it needs
little memory), then converts it into each target format in a fresh process and reports that process's peak
resident memory (ru_maxrss) next to the checkpoint's size. A fresh process's imports (numpy, h5py, torch,
flax...) are part of its peak, so the import-only baseline is measured too and subtracted in the last column.

    python benchmarks/benchmark_convert_memory.py --shape 400M-distill --dtype float32 --to safetensors,tf,flax,pt
    python benchmarks/benchmark_convert_memory.py --shape 3B --dtype float16 --to safetensors,tf,flax --timeout 600

The target is a peak at most 1.3x the checkpoint's size (two full copies would be 2x and more). A target
whose writer's module is not installed (tf: h5py, flax: flax, pt: torch) is skipped with a line saying so.
Prints one line per target, `benchmark_convert_memory <target>: ok|FAIL|SKIP|TIMEOUT ...`. Exit status: 0
every measured target within the target ratio, 1 one above it, failed or ran past --timeout, 3 one skipped
and none failed. The checkpoints go into a temporary folder under --workdir, removed in every case, SIGTERM
(`timeout`) included.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from benchmark_generate import SHAPES, make_config

from blenderbot_mb.checkpoint import StoredTensor, write_safetensors
from blenderbot_mb.naming import tensor_specs

TARGET_RATIO = 1.3
CHILD = """
import resource, sys
from blenderbot_mb.convert import convert_checkpoint
{imports}
if {convert}:
    convert_checkpoint(sys.argv[1], sys.argv[2], to=sys.argv[3], force=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
MODULES = {"safetensors": "safetensors", "tf": "h5py", "flax": "flax", "pt": "torch"}  # what each writer needs
IMPORTS = {"safetensors": "import safetensors", "tf": "import h5py", "flax": "import flax.serialization, msgpack",
           "pt": "import torch"}


def generate(folder: str, config, dtype: str) -> int:
    """A random checkpoint of `config`'s shape; each tensor is made when written. Returns its size in bytes."""
    rng = np.random.default_rng(0)

    def make(shape):
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    tensors = {s.name: StoredTensor(s.shape, dtype, make(s.shape)) for s in tensor_specs(config)}
    os.makedirs(folder, exist_ok=True)
    config.replace(architectures=["BlenderbotForConditionalGeneration"]).save_pretrained(folder)
    write_safetensors(tensors, folder, max_shard_size="100GB")
    return sum(t.nbytes for t in tensors.values())


def peak_rss(src: str, dst: str, to: str, convert: bool, timeout: float | None) -> tuple[int, float]:
    """Peak RSS in bytes and seconds of a fresh process that imports the writer's module and (`convert`)
    converts src into dst. Raises subprocess.TimeoutExpired (the process killed) or RuntimeError."""
    code = CHILD.format(imports=IMPORTS[to], convert=convert)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, src, dst, to], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return int(out.stdout.split()[-1]), time.perf_counter() - start


def measure(to: str, src: str, work: str, size: int, args) -> str:
    """One target's row and summary line; returns ok, FAIL, TIMEOUT or SKIP."""
    if to not in MODULES:
        print(f"benchmark_convert_memory {to}: FAIL unknown target; choose from {', '.join(MODULES)}", flush=True)
        return "FAIL"
    if importlib.util.find_spec(MODULES[to]) is None:
        print(f"| {to} | skipped: needs the `{MODULES[to]}` module, not installed here | | | | |", flush=True)
        print(f"benchmark_convert_memory {to}: SKIP needs {MODULES[to]} (not installed)", flush=True)
        return "SKIP"
    dst = os.path.join(work, f"out-{to}")
    try:
        base, _ = peak_rss(src, dst, to, convert=False, timeout=args.timeout)
        peak, seconds = peak_rss(src, dst, to, convert=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"benchmark_convert_memory {to}: TIMEOUT after {args.timeout} s", flush=True)
        return "TIMEOUT"
    except RuntimeError as e:
        print(f"benchmark_convert_memory {to}: FAIL the conversion stopped: {e}", flush=True)
        return "FAIL"
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    status = "ok" if peak / size <= TARGET_RATIO else "FAIL"
    print(f"| {to} | {peak / 1e9:.2f} GB | {peak / size:.2f} | {base / 1e9:.2f} GB | "
          f"{(peak - base) / size:.2f} | {seconds:.0f} s |", flush=True)
    print(f"benchmark_convert_memory {to}: {status} peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the "
          f"checkpoint (target <= {TARGET_RATIO}), {(peak - base) / size:.2f}x without the imports", flush=True)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="400M-distill", help="a preset (400M-distill, 1B-distill, 3B) or tiny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--to", default="safetensors,tf,flax,pt", help="target formats, comma-separated")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each conversion")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where to write the checkpoints")
    args = parser.parse_args()
    config = make_config(args.shape if args.shape in SHAPES else f"blenderbot-{args.shape}")
    # `timeout` sends SIGTERM: leave through the `finally` that removes the checkpoints
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = tempfile.mkdtemp(dir=args.workdir, prefix="convert-memory-")
    try:
        src = os.path.join(work, "src")
        start = time.perf_counter()
        size = generate(src, config, args.dtype)
        print(f"checkpoint: {args.shape} shape, {args.dtype}, {size / 1e9:.2f} GB (model.safetensors, "
              f"generated in {time.perf_counter() - start:.0f} s)")
        print("| target | peak RSS | peak / checkpoint | import-only RSS | (peak - imports) / checkpoint | time |")
        print("|---|---|---|---|---|---|", flush=True)
        statuses = [measure(to, src, work, size, args) for to in args.to.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if {"FAIL", "TIMEOUT"} & set(statuses) else 3 if "SKIP" in statuses else 0)


if __name__ == "__main__":
    main()
