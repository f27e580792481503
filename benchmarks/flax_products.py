"""The products of a Flax decoding step, XLA's against Pallas kernels (Triton) that hold the layer norm, the
bias, the activation and the residual: us a product over a chain shaped like the 400M decoder's.

Each decoder layer of the chain runs six products in the decoder's order and with its epilogues:

    q/k/v (norm, 1280 -> 3840) | out (+ residual) | cross q (norm) | cross out (+ residual)
    | fc1 (norm, gelu, 1280 -> 5120) | fc2 (5120 -> 1280, + residual)

(the attention between them is left out: the first 1280 columns of q/k/v stand in for its output). Every
layer has weights of its own, so a product reads its weight from memory, not the L2, as in a decoding step.

- `xla-R`: the chain in jax.numpy for R rows, as the Flax step writes it (float32 norm statistics, bf16
  products with float32 sums), compiled by XLA: today's path runs R = 4 (`flax.generation.GPU_ROWS`).
- `pallas-R-BN-BK-W-S`: each product one Pallas kernel over blocks of BN outputs, K in blocks of BK, W warps,
  S pipeline stages; R rows (16 at least: Triton's dot), the norm's statistics made by each program from
  the rows it holds.

    python benchmarks/flax_products.py                   # one GPU: every variant, us a product
    python benchmarks/flax_products.py --interpret       # the CPU: Pallas in its interpreter, values only

Prints one line per variant: us a product (best of --repeats, each a call of the whole chain), the largest
difference to the XLA chain of the same rows (float32 logits of bf16 values), and whether it compiled.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

LAYER = (  # name, K, N, norm, activation, residual
    ("qkv", 1280, 3840, True, None, False),
    ("out", 1280, 1280, False, None, True),
    ("cross_q", 1280, 1280, True, None, False),
    ("cross_out", 1280, 1280, False, None, True),
    ("fc1", 1280, 5120, True, "gelu", False),
    ("fc2", 5120, 1280, False, None, True),
)


def make_weights(layers: int, scale: float = 0.02, seed: int = 0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        layer = {}
        for name, k, n, norm, _, _ in LAYER:
            p = {"w": jnp.asarray(rng.normal(0, scale, (k, n)), jnp.bfloat16),
                 "bias": jnp.asarray(rng.normal(0, 0.1, (n,)), jnp.bfloat16)}
            if norm:
                p["g"] = jnp.asarray(1 + rng.normal(0, 0.1, (k,)), jnp.bfloat16)
                p["b"] = jnp.asarray(rng.normal(0, 0.1, (k,)), jnp.bfloat16)
            layer[name] = p
        out.append(layer)
    return out


def _gelu(x):
    import jax

    return jax.nn.gelu(x, approximate=False)


_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(x):
    """float32 erf as a rational function of x (Eigen's and XLA's): within 5e-7 of lax.erf."""
    import jax.numpy as jnp

    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.float32(_ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = jnp.float32(_ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def xla_product(x, p, norm, act, residual):
    import jax.numpy as jnp
    from jax import lax

    h = x
    if norm:
        xf = x.astype(jnp.float32)
        mu = xf.mean(-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(-1, keepdims=True)
        h = ((xf - mu) * lax.rsqrt(var + 1e-5) * p["g"].astype(jnp.float32) + p["b"].astype(jnp.float32))
        h = h.astype(jnp.bfloat16)
    y = jnp.dot(h, p["w"], preferred_element_type=jnp.float32) + p["bias"].astype(jnp.float32)
    if act:
        y = _gelu(y)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(jnp.bfloat16)


def pallas_product(x, p, norm, act, residual, *, bn, bk, warps, stages, interpret=False):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, k = x.shape
    n = p["w"].shape[1]
    if k % bk or n % bn:
        raise ValueError(f"blocks of {bk} x {bn} do not tile a [{k}, {n}] weight")
    blocks = k // bk

    def kernel(*refs):
        it = iter(refs)
        x_ref = next(it)
        g_ref, b_ref = (next(it), next(it)) if norm else (None, None)
        w_ref, bias_ref = next(it), next(it)
        r_ref = next(it) if residual is not None else None
        o_ref = next(it)
        if norm:
            def stats(i, carry):
                s, ss = carry
                xb = x_ref[:, pl.ds(i * bk, bk)].astype(jnp.float32)
                return s + xb.sum(-1, keepdims=True), ss + (xb * xb).sum(-1, keepdims=True)

            zero = jnp.zeros((rows, 1), jnp.float32)
            s, ss = lax.fori_loop(0, blocks, stats, (zero, zero))
            mu = s / k
            rstd = lax.rsqrt(ss / k - mu * mu + 1e-5)

        def body(i, acc):
            sl = pl.ds(i * bk, bk)
            xb = x_ref[:, sl]
            if norm:
                xb = ((xb.astype(jnp.float32) - mu) * rstd * g_ref[sl][None, :].astype(jnp.float32)
                      + b_ref[sl][None, :].astype(jnp.float32)).astype(jnp.bfloat16)
            return acc + plgpu.dot(xb, w_ref[sl, :])

        y = lax.fori_loop(0, blocks, body, jnp.zeros((rows, bn), jnp.float32))
        y = y + bias_ref[...][None, :].astype(jnp.float32)
        if act:  # exact gelu (Pallas' Triton lowering has neither erf nor erfc)
            y = 0.5 * y * (1 + _erf(y * np.float32(2**-0.5)))
        if r_ref is not None:
            y = y + r_ref[...].astype(jnp.float32)
        o_ref[...] = y.astype(o_ref.dtype)

    args = [x]
    specs = [pl.BlockSpec((rows, k), lambda j: (0, 0))]
    if norm:
        args += [p["g"], p["b"]]
        specs += [pl.BlockSpec((k,), lambda j: (0,))] * 2
    args += [p["w"], p["bias"]]
    specs += [pl.BlockSpec((k, bn), lambda j: (0, j)), pl.BlockSpec((bn,), lambda j: (j,))]
    if residual is not None:
        args.append(residual)
        specs.append(pl.BlockSpec((rows, bn), lambda j: (0, j)))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype), grid=(n // bn,), in_specs=specs,
        out_specs=pl.BlockSpec((rows, bn), lambda j: (0, j)), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))(*args)


def chain(product, x, weights):
    """The layers' products in order; returns the last rows (bf16 [R, 1280])."""
    for layer in weights:
        h = product(x, layer["qkv"], True, None, None)[:, :1280]
        x = product(h, layer["out"], False, None, x)
        h = product(x, layer["cross_q"], True, None, None)
        x = product(h, layer["cross_out"], False, None, x)
        h = product(x, layer["fc1"], True, "gelu", None)
        x = product(h, layer["fc2"], False, None, x)
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--variants", default="xla-4,xla-16,pallas-16-16-256-4-2,pallas-16-32-256-4-2,"
                   "pallas-16-32-128-4-3,pallas-16-64-128-4-3,pallas-16-32-256-8-2,pallas-16-64-256-8-2,"
                   "pallas-16-16-128-2-3,xla-4")
    p.add_argument("--interpret", action="store_true", help="Pallas in its interpreter (the CPU): values only")
    args = p.parse_args(argv)

    from functools import partial

    import jax
    import jax.numpy as jnp

    weights = make_weights(args.layers)
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (16, 1280)).astype(np.float32)
    reference = {}
    products = len(LAYER) * args.layers
    print(f"{jax.devices()[0].device_kind}, {args.layers} layers, {products} products a chain", flush=True)
    for variant in args.variants.split(","):
        kind, *nums = variant.split("-")
        rows = int(nums[0])
        x = jnp.asarray(base[:rows], jnp.bfloat16)
        if kind == "xla":
            fn = jax.jit(lambda x, w: chain(xla_product, x, w))
        else:
            bn, bk, warps, stages = map(int, nums[1:])
            fn = jax.jit(lambda x, w, bn=bn, bk=bk, warps=warps, stages=stages: chain(
                partial(pallas_product, bn=bn, bk=bk, warps=warps, stages=stages, interpret=args.interpret),
                x, w))
        try:
            start = time.perf_counter()
            out = np.asarray(fn(x, weights).astype(jnp.float32))
            first = time.perf_counter() - start
        except Exception as e:  # a setting Triton or Pallas refuses: say so, go on
            print(f"{variant} | failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if kind == "xla" and rows not in reference:
            reference[rows] = out
        ref = reference.get(rows)
        if ref is None:
            ref = np.asarray(jax.jit(lambda x, w: chain(xla_product, x, w))(x, weights).astype(jnp.float32))
            reference[rows] = ref
        err = float(np.abs(out - ref).max())
        best = float("inf")
        if not args.interpret:
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(x, weights).block_until_ready()
                best = min(best, time.perf_counter() - start)
        print(f"{variant} | {best / products * 1e6:.2f} us a product | max difference to XLA {err:.3g} "
              f"| first call {first:.1f} s", flush=True)


if __name__ == "__main__":
    main()
