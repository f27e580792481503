"""Peak memory of `convert`: does a conversion stream tensor by tensor, or hold the model twice?

Writes a random checkpoint of a preset's shape (safetensors, written tensor by tensor, so generating it needs
little memory), then converts it into each target format in a fresh process and reports that process's peak
resident memory (ru_maxrss) next to the checkpoint's size. A fresh process's imports (numpy, h5py, torch,
flax...) are part of its peak, so the import-only baseline is measured too and subtracted in the last column.

    python benchmarks/benchmark_convert_memory.py --shape 400M-distill --dtype float32 --to safetensors,tf,flax,pt
    python benchmarks/benchmark_convert_memory.py --shape 3B --dtype float16 --to safetensors,tf

The target is a peak at most 1.3x the checkpoint's size (two full copies would be 2x and more).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from blenderbot_mb.checkpoint import StoredTensor, write_safetensors
from blenderbot_mb.config import BlenderbotConfig
from blenderbot_mb.naming import tensor_specs
from blenderbot_mb.presets import PRESETS

CHILD = """
import resource, sys
from blenderbot_mb.convert import convert_checkpoint
{imports}
if {convert}:
    convert_checkpoint(sys.argv[1], sys.argv[2], to=sys.argv[3], force=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
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


def peak_rss(src: str, dst: str, to: str, convert: bool) -> tuple[int, float]:
    code = CHILD.format(imports=IMPORTS[to], convert=convert)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, src, dst, to], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return int(out.stdout.split()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="400M-distill", help="a preset: 400M-distill, 1B-distill, 3B")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--to", default="safetensors,tf,flax,pt", help="target formats, comma-separated")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()
    config = BlenderbotConfig.from_dict(PRESETS[f"blenderbot-{args.shape}"]["config"])
    work = tempfile.mkdtemp(dir=args.workdir, prefix="convert-memory-")
    try:
        src = os.path.join(work, "src")
        size = generate(src, config, args.dtype)
        print(f"checkpoint: {args.shape} shape, {args.dtype}, {size / 1e9:.2f} GB (model.safetensors)")
        print("| target | peak RSS | peak / checkpoint | import-only RSS | (peak - imports) / checkpoint | time |")
        print("|---|---|---|---|---|---|")
        for to in args.to.split(","):
            dst = os.path.join(work, f"out-{to}")
            base, _ = peak_rss(src, dst, to, convert=False)
            peak, seconds = peak_rss(src, dst, to, convert=True)
            print(f"| {to} | {peak / 1e9:.2f} GB | {peak / size:.2f} | {base / 1e9:.2f} GB | "
                  f"{(peak - base) / size:.2f} | {seconds:.0f} s |", flush=True)
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
