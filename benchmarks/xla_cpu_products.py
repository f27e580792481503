"""XLA:CPU's one-row products by weight type, as a Flax int8 (or bf16) decoding step would run them: us a
[1280 x 5120] product (the 400M shape's fc1) of one row, float32 against int8, bfloat16 and float16 weights,
each in a jitted chain of 8 products with weights of their own. Run it with one thread, as the speed table's
CPU rows are:

    NPROC=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false JAX_PLATFORMS=cpu python benchmarks/xla_cpu_products.py
    NPROC=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false --xla_cpu_use_onednn=true" ... # XLA's library paths

Prints one line per product type (best of --repeats) and its time over float32's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1280)
    p.add_argument("--n", type=int, default=5120)
    p.add_argument("--chain", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.02, (args.k, args.n)).astype(np.float32) for _ in range(args.chain)]
    row = rng.normal(0, 1, (1, args.k)).astype(np.float32)
    scale = [np.abs(w).max(0) / 127 for w in weights]
    quantized = [np.round(w / s).astype(np.int8) for w, s in zip(weights, scale, strict=True)]

    def products(x, ws, **kw):
        return sum(lax.dot(x, w, **kw) for w in ws)

    def dynamic(x, ws, scales):  # the activations quantized per row: int8 x int8, int32 sums
        s = jnp.abs(x).max(-1, keepdims=True) / 127
        xq = jnp.round(x / s).astype(jnp.int8)
        return sum(lax.dot(xq, w, preferred_element_type=jnp.int32).astype(jnp.float32) * s * c
                   for w, c in zip(ws, scales, strict=True))

    def weight_only(x, ws, scales):  # int8 weights turned to float32 inside the product's fusion
        return sum(lax.dot(x, w.astype(jnp.float32)) * c for w, c in zip(ws, scales, strict=True))

    cases = {
        "float32": (jax.jit(products), jnp.asarray(row), [jnp.asarray(w) for w in weights], {}),
        "int8 x int8 (activations quantized per row)": (
            jax.jit(dynamic), jnp.asarray(row), [jnp.asarray(w) for w in quantized],
            {"scales": [jnp.asarray(s) for s in scale]}),
        "float32 x int8 weights (dequantized in the product)": (
            jax.jit(weight_only), jnp.asarray(row), [jnp.asarray(w) for w in quantized],
            {"scales": [jnp.asarray(s) for s in scale]}),
        "bfloat16 x bfloat16, float32 sums": (
            jax.jit(lambda x, ws: products(x, ws, preferred_element_type=jnp.float32)),
            jnp.asarray(row, jnp.bfloat16), [jnp.asarray(w, jnp.bfloat16) for w in weights], {}),
        "float16 x float16, float32 sums": (
            jax.jit(lambda x, ws: products(x, ws, preferred_element_type=jnp.float32)),
            jnp.asarray(row, jnp.float16), [jnp.asarray(w, jnp.float16) for w in weights], {}),
    }
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, one row x [{args.k} x {args.n}]", flush=True)
    base = None
    for name, (fn, x, ws, extra) in cases.items():
        fn(x, ws, **extra).block_until_ready()
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(x, ws, **extra).block_until_ready()
            best = min(best, time.perf_counter() - start)
        us = best / args.chain * 1e6
        base = base or us
        print(f"{name} | {us:.1f} us a product | {us / base:.2f}x float32", flush=True)


if __name__ == "__main__":
    main()
