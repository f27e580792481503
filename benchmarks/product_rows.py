"""cuBLAS's product time against the number of rows, at a model's decoder shapes, on a GPU: each weight read
from memory (copies of it in turn, 400 MB in all), replayed in a CUDA graph; us per product.

    python benchmarks/product_rows.py --shapes 400M-distill,3B --rows 1,8,10,16,32,64

At decoding's row counts a product's time is its weight's bytes over the bandwidth plus a cost of its own per
kernel, whatever the rows: padding rows to another count, or a step of fewer rows, changes nothing there;
fewer kernels (or kernels that overlap) do.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from benchmark_generate import make_config


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="400M-distill,3B")
    p.add_argument("--rows", default="1,8,10,16,20,32,40,64")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} {args.dtype}; us per product (rows: us)")
    for shape in args.shapes.split(","):
        config = make_config(shape if shape.startswith("blenderbot") else f"blenderbot-{shape}")
        d, f = config.d_model, config.decoder_ffn_dim
        for n, k in ((d, d), (3 * d, d), (f, d), (d, f)):
            size = n * k * torch.tensor([], dtype=dtype).element_size()
            copies = max(2, (400 << 20) // size)
            weights = [(torch.randn(n, k, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype))
                       for _ in range(copies)]
            times = []
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=dtype)

                def run(x=x, weights=weights):
                    for w, b in weights:
                        F.linear(x, w, b)

                times.append(bench(run) / copies)
            print(f"{shape:<14} [{n}x{k}] {size / 2**20:6.1f} MB  "
                  + "  ".join(f"{m}: {t:.2f}" for m, t in zip(rows, times, strict=True)), flush=True)


if __name__ == "__main__":
    main()
