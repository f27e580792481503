"""A greedy decoding step of the 400M decoder in jax.numpy, in a jitted loop as the Flax search runs it, with
the pre-norms folded into the products that follow them: fewer kernels a step?

XLA runs the Flax step (`flax/generation.py`) as ~260 kernels a step (0.69 ms on an H200 at batch 1 against
the PyTorch Triton step's 98 kernels and ~0.46 ms); a layer norm before a product is two of them (its
statistics, then the normalized rows, which the product reads). A norm's gain and bias fold into the weight
that follows it:

    LN(x) @ W + bias = r * (x @ W' - m * c) + d,   W' = diag(g) W,  c = 1^T W',  d = beta @ W + bias

(m, r: the row's mean and 1 / std). The product reads x itself and runs beside the statistics, and the
epilogue (r, m: one number a row) joins the product's sum of its split-K parts. The product sums in float32,
so the subtraction loses nothing that the bf16 x had not lost already.

Variants (`--variants`, each `NORM-CACHE-ROWS`):
- NORM `plain`: the Flax step's arithmetic (float32 statistics, the normalized rows in bf16, bf16 products
  summed in float32, separate q, k and v weights as Flax's Dense layers hold them);
  `folded`: the norms folded as above (one q/k/v weight of 3840 columns).
- CACHE `kv2`: keys and values in two arrays, two writes a layer (the Flax cache); `kv1`: one array, the new
  key and value written in one update.
- ROWS: decoder rows (the Flax search pads one row to 4 on GPUs: `GPU_ROWS`).

    python benchmarks/flax_folded_step.py            # one GPU: ms a step, kernels a step, tokens against plain
    python benchmarks/flax_folded_step.py --check    # any device: float32 logits of one step, folded vs plain

Random weights of the 400M-distill decoder's shapes, a 40-token encoder output, 60 steps a call.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np

D, H, FFN, VOCAB, POSITIONS = 1280, 32, 5120, 8008, 128


def make_params(layers: int, dtype, seed: int = 0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.02):
        return jnp.asarray(rng.normal(0, scale, shape), dtype)

    def norm():
        return {"g": jnp.asarray(1 + rng.normal(0, 0.1, (D,)), dtype), "b": w(D, scale=0.1)}

    out = {"embed": w(VOCAB, D, scale=0.05), "pos": w(POSITIONS, D, scale=0.05), "final": norm(),
           "logits_bias": w(VOCAB, scale=0.1), "layers": []}
    for _ in range(layers):
        out["layers"].append({
            "ln1": norm(), "q": w(D, D), "bq": w(D, scale=0.1), "k": w(D, D), "bk": w(D, scale=0.1),
            "v": w(D, D), "bv": w(D, scale=0.1), "o": w(D, D), "bo": w(D, scale=0.1),
            "ln2": norm(), "q2": w(D, D), "bq2": w(D, scale=0.1), "o2": w(D, D), "bo2": w(D, scale=0.1),
            "ln3": norm(), "fc1": w(D, FFN), "b1": w(FFN, scale=0.1), "fc2": w(FFN, D), "b2": w(D, scale=0.1)})
    return out


def fold(norm, weight, bias):
    """(W', c, d) of a norm folded into the product after it (float32 c and d)."""
    import jax.numpy as jnp

    folded = (norm["g"].astype(jnp.float32)[:, None] * weight.astype(jnp.float32)).astype(weight.dtype)
    c = folded.astype(jnp.float32).sum(0)
    d = norm["b"].astype(jnp.float32) @ weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return {"w": folded, "c": c, "d": d}


def fold_params(p):
    import jax.numpy as jnp

    layers = []
    for lp in p["layers"]:
        qkv = jnp.concatenate([lp["q"], lp["k"], lp["v"]], 1)
        bqkv = jnp.concatenate([lp["bq"], lp["bk"], lp["bv"]])
        layers.append({"qkv": fold(lp["ln1"], qkv, bqkv), "o": lp["o"], "bo": lp["bo"],
                       "q2": fold(lp["ln2"], lp["q2"], lp["bq2"]), "o2": lp["o2"], "bo2": lp["bo2"],
                       "fc1": fold(lp["ln3"], lp["fc1"], lp["b1"]), "fc2": lp["fc2"], "b2": lp["b2"]})
    head = fold(p["final"], p["embed"].T, p["logits_bias"])
    return {"embed": p["embed"], "pos": p["pos"], "head": head, "layers": layers}


def _stats(x):
    import jax.numpy as jnp
    from jax import lax

    xf = x.astype(jnp.float32)
    m = xf.mean(-1, keepdims=True)
    return m, lax.rsqrt(((xf - m) ** 2).mean(-1, keepdims=True) + 1e-5)


def _norm(x, norm):
    import jax.numpy as jnp

    m, r = _stats(x)
    y = (x.astype(jnp.float32) - m) * r * norm["g"].astype(jnp.float32) + norm["b"].astype(jnp.float32)
    return y.astype(x.dtype)


def _dense(x, w, b):
    import jax.numpy as jnp

    return (jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _folded(x, f, out_dtype=None):
    import jax.numpy as jnp

    m, r = _stats(x)
    y = jnp.dot(x, f["w"], preferred_element_type=jnp.float32)
    return (r * (y - m * f["c"]) + f["d"]).astype(out_dtype or x.dtype)


def _attend(q, keys, values, mask):
    """q [B, D]; keys/values [B, H, T, hd]; mask [B or 1, T] (True: attend) -> [B, D]."""
    import jax
    import jax.numpy as jnp

    b = q.shape[0]
    hd = D // H
    qh = q.reshape(b, H, hd)
    s = jnp.einsum("bhd,bhtd->bht", qh, keys, preferred_element_type=jnp.float32) * hd ** -0.5
    s = jnp.where(mask[:, None, :], s, jnp.finfo(jnp.float32).min)
    a = jax.nn.softmax(s, -1).astype(q.dtype)
    return jnp.einsum("bht,bhtd->bhd", a, values, preferred_element_type=jnp.float32).astype(q.dtype).reshape(b, D)


def step(p, folded: bool, kv1: bool, tok, pos, cache, cross, enc_mask):
    """Logits [B, V] float32 of one token per row at `pos`, and the updated cache."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    b = tok.shape[0]
    hd = D // H
    t = cache.shape[-2]
    x = (p["embed"][tok].astype(jnp.float32) * D ** 0.5 + p["pos"][pos].astype(jnp.float32)).astype(
        p["embed"].dtype)
    self_mask = (jnp.arange(t) <= pos)[None, :]
    for i, lp in enumerate(p["layers"]):
        if folded:
            qkv = _folded(x, lp["qkv"])
            q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
        else:
            h = _norm(x, lp["ln1"])
            q, k, v = _dense(h, lp["q"], lp["bq"]), _dense(h, lp["k"], lp["bk"]), _dense(h, lp["v"], lp["bv"])
        k, v = k.reshape(b, H, 1, hd), v.reshape(b, H, 1, hd)
        if kv1:  # cache [L, 2, B, H, T, hd]
            cache = lax.dynamic_update_slice(cache, jnp.stack([k, v])[None], (i, 0, 0, 0, pos, 0))
            keys, values = cache[i, 0], cache[i, 1]
        else:  # cache [2, L, B, H, T, hd]: two writes
            cache = lax.dynamic_update_slice(cache, k[None, None], (0, i, 0, 0, pos, 0))
            cache = lax.dynamic_update_slice(cache, v[None, None], (1, i, 0, 0, pos, 0))
            keys, values = cache[0, i], cache[1, i]
        x = x + _dense(_attend(q, keys, values, self_mask), lp["o"], lp["bo"])
        q2 = _folded(x, lp["q2"]) if folded else _dense(_norm(x, lp["ln2"]), lp["q2"], lp["bq2"])
        x = x + _dense(_attend(q2, cross[i][0], cross[i][1], enc_mask), lp["o2"], lp["bo2"])
        if folded:
            f = jax.nn.gelu(_folded(x, lp["fc1"], jnp.float32), approximate=False).astype(x.dtype)
        else:
            h = _norm(x, lp["ln3"])
            f = jax.nn.gelu((jnp.dot(h, lp["fc1"], preferred_element_type=jnp.float32)
                             + lp["b1"].astype(jnp.float32)), approximate=False).astype(x.dtype)
        x = x + _dense(f, lp["fc2"], lp["b2"])
    if folded:
        logits = _folded(x, p["head"], jnp.float32)
    else:
        logits = (jnp.dot(_norm(x, p["final"]), p["embed"].T, preferred_element_type=jnp.float32)
                  + p["logits_bias"].astype(jnp.float32))
    return logits, cache


def make_loop(folded: bool, kv1: bool, steps: int):
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.jit
    def run(p, tok, cache, cross, enc_mask):
        def body(i, carry):
            tok, cache, out = carry
            logits, cache = step(p, folded, kv1, tok, i, cache, cross, enc_mask)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            return tok, cache, out.at[:, i].set(tok)

        out = jnp.zeros((tok.shape[0], steps), jnp.int32)
        return lax.fori_loop(0, steps, body, (tok, cache, out))[2]

    return run


def kernels_in_loop(compiled_text: str) -> int:
    """Kernel-like instructions (fusions, custom calls, copies, updates) in the while loop's body."""
    body = re.search(r"while\(.*?body=%?([\w.\-]+)", compiled_text)
    if not body:
        return -1
    block = re.search(r"\n%?" + re.escape(body.group(1)) + r" .*?\{\n(.*?)\n\}", compiled_text, re.S)
    if not block:
        return -1
    skip = ("parameter(", "constant(", "get-tuple-element(", "tuple(", "bitcast(")
    return sum(1 for line in block.group(1).splitlines() if "=" in line and not any(s in line for s in skip))


def inputs(params_dtype, rows, layers, cache_len=64, enc_len=40, seed=1):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    hd = D // H
    cross = [tuple(jnp.asarray(rng.normal(0, 1, (rows, H, 64, hd)), params_dtype) for _ in range(2))
             for _ in range(layers)]
    enc_mask = jnp.asarray(np.arange(64)[None, :] < enc_len).repeat(rows, 0)
    tok = jnp.asarray(rng.integers(4, VOCAB, rows), jnp.int32)
    kv2 = jnp.zeros((2, layers, rows, H, cache_len, hd), params_dtype)
    kv1 = jnp.zeros((layers, 2, rows, H, cache_len, hd), params_dtype)
    return tok, kv1, kv2, cross, enc_mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="plain-kv2-4,folded-kv2-4,plain-kv1-4,folded-kv1-4,plain-kv2-1,"
                    "folded-kv1-1,plain-kv2-4")
    ap.add_argument("--check", action="store_true", help="float32 logits of one step, folded against plain")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    if args.check:
        p = make_params(args.layers, jnp.float32)
        tok, kv1, kv2, cross, enc_mask = inputs(jnp.float32, 2, args.layers)
        a, _ = jax.jit(lambda p, c: step(p, False, False, tok, 3, c, cross, enc_mask))(p, kv2)
        b, _ = jax.jit(lambda p, c: step(p, True, True, tok, 3, c, cross, enc_mask))(fold_params(p), kv1)
        err = float(jnp.abs(a - b).max())
        print(f"float32 logits, folded against plain: max |difference| {err:.3g} (logits' scale "
              f"{float(jnp.abs(a).max()):.3g})")
        return

    p = make_params(args.layers, jnp.bfloat16)
    pf = fold_params(p)
    print(f"{jax.devices()[0].device_kind}, {args.layers} layers, bf16, {args.steps} steps a call", flush=True)
    tokens = {}
    for variant in args.variants.split(","):
        norm, cache_kind, rows = variant.split("-")
        rows = int(rows)
        folded, kv1 = norm == "folded", cache_kind == "kv1"
        tok, c1, c2, cross, enc_mask = inputs(jnp.bfloat16, rows, args.layers)
        run = make_loop(folded, kv1, args.steps)
        params, cache = (pf if folded else p), (c1 if kv1 else c2)
        lowered = run.lower(params, tok, cache, cross, enc_mask).compile()
        count = kernels_in_loop(lowered.as_text())
        out = np.asarray(run(params, tok, cache, cross, enc_mask))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(params, tok, cache, cross, enc_mask).block_until_ready()
            best = min(best, time.perf_counter() - start)
        ref = tokens.setdefault(rows, out)
        same = float((out == ref).mean())
        print(f"{variant:16s} {best / args.steps * 1e3:.4f} ms/step  kernels in the loop body {count}  "
              f"tokens equal to the first variant's {same:.3f}", flush=True)


if __name__ == "__main__":
    main()
