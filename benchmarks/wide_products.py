"""A wide model's square products at a few rows on one GPU: cuBLAS against the several-row product kernel
(`kernels.linear`), a chain of products each feeding the next, captured as one CUDA graph; us a product.

    python benchmarks/wide_products.py --size 2560 --rows 10,16      # the 3B shape's [2560 x 2560] products

Ways:
- cuBLAS alone, with the residual added by a kernel of its own, and after a layer norm (F.layer_norm, as the
  compiled step's norms run before cuBLAS's products);
- the several-row kernel with the package's settings (`kernels.rows_config`: for K over 1280 the K split in
  parts whose sums the last part adds in order), alone and with the residual in its epilogue;
- the several-row kernel holding the whole of K a program (the only way it can make a norm: the statistics
  need whole rows), BLOCK_N outputs a program and a number of warps (`--whole`), without and with the norm.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from grid_barrier import graph_time

from blenderbot_mb.torch import kernels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2560, help="N = K of every product")
    p.add_argument("--rows", default="10,16")
    p.add_argument("--products", type=int, default=48)
    p.add_argument("--whole", default="32x8,32x16,16x4,16x8", help="BLOCK_NxWARPS settings holding the whole K")
    args = p.parse_args(argv)
    n = k = args.size
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.randn(args.products, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    norm = torch.nn.LayerNorm(k, device="cuda", dtype=torch.bfloat16)
    ways = {
        "cuBLAS": lambda y, w: F.linear(y, w, bias),
        "cuBLAS, then the residual": lambda y, w: F.linear(y, w, bias) + y,
        "cuBLAS after a layer norm": lambda y, w: F.linear(F.layer_norm(y, (k,), norm.weight, norm.bias), w, bias),
        "several-row kernel, package settings": lambda y, w: kernels.linear(y, w, bias),
        "the same with the residual": lambda y, w: kernels.linear(y, w, bias, residual=y),
    }
    for setting in filter(None, args.whole.split(",")):
        bn, warps = (int(v) for v in setting.split("x"))
        cfg = kernels.RowsConfig(block_n=bn, block_k=256, chunks=triton.cdiv(k, 256), warps=warps)
        ways[f"whole K, {bn} outputs, {warps} warps"] = lambda y, w, c=cfg: kernels.linear(y, w, bias, config=c)
        ways[f"whole K, {bn} outputs, {warps} warps, norm"] = lambda y, w, c=cfg: kernels.linear(
            y, w, bias, norm=norm, config=c)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"{args.products} products [{n} x {k}] bf16, us a product")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
        for name, product in ways.items():
            def chain(product=product, x=x):
                y = x
                for w in weights:
                    y = product(y, w)
                return y

            print(f"{rows:3d} rows  {name:<44} {graph_time(chain) / args.products:7.2f}", flush=True)


if __name__ == "__main__":
    main()
