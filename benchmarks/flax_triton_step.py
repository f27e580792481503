"""The Triton kernels of PyTorch's `generate(kernels=True)` step (`blenderbot_mb.torch.kernels`) launched from JAX
through jax-triton: a greedy step of the 400M shape (random bf16 weights, 40-token encoder states) as 8 Triton
kernels a decoder layer, inside one jitted `lax.fori_loop` of 60 steps, against the Flax generate() step that
XLA compiles (`flax_decode.py`, run beside it in the same job).

The kernels are the PyTorch path's own (the same source), each wrapped in a Triton function whose arguments
are in jax-triton's order (inputs, then outputs); writes into inputs (the embedded row, the cache's new key and
value) are outputs aliased to those inputs. Programmatic dependent launch is off (jax-triton's launch does not
set it).

    pip install jax-triton        # (not a dependency of the package)
    python benchmarks/flax_triton_step.py                 # jax-triton's custom call
    python benchmarks/flax_triton_step.py --target ffi    # jaxlib's typed-FFI Triton call, as Pallas emits it
    python benchmarks/flax_triton_step.py --rows 4

Prints ms per step (best of --repeats) with the first tokens, and one step's call outside the loop.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import jax_triton as jt
import numpy as np
import triton
import triton.language as tl

from blenderbot_mb.torch import kernels as K  # the kernels' Triton source (its launchers are PyTorch's)


def use_ffi_target() -> None:
    """Lower jax-triton's calls to jaxlib's `triton_kernel_call_ffi` (typed FFI, the target Pallas' Triton
    calls lower to) instead of its legacy custom call."""
    import jax_triton.triton_lib as lib
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    def ir_type(ctx, aval):
        try:
            return mlir.aval_to_ir_type(ctx.module_context, aval)
        except TypeError:
            return mlir.aval_to_ir_type(aval)

    class Ffi:
        @staticmethod
        def ffi_lowering(target, api_version=2, backend_config=b"", operand_output_aliases=None):
            def rule(ctx, *args):
                return mlir.custom_call(
                    "triton_kernel_call_ffi", result_types=[ir_type(ctx, a) for a in ctx.avals_out], operands=args,
                    backend_config=dict(name=ir.StringAttr.get("blenderbot"), opaque=ir.StringAttr.get(backend_config)),
                    operand_layouts=[list(reversed(range(a.ndim))) for a in ctx.avals_in],
                    result_layouts=[list(reversed(range(a.ndim))) for a in ctx.avals_out],
                    operand_output_aliases=operand_output_aliases or None).results
            return rule

    class JaxWithFfi:
        def __getattr__(self, name):
            return Ffi if name == "ffi" else getattr(jax, name)

    lib.jax = JaxWithFfi()


@triton.jit
def lin_j(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, tok_ptr, emb_ptr, pos_ptr, idx_ptr,
          N, Kd, eps, stride_xm, stride_wn, stride_rm, stride_ym, scale, stride_em, stride_pm, y_ptr,
          NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr, EMBED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW: tl.constexpr):
    K._linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, y_ptr, N, Kd, eps, stride_xm, stride_wn, stride_rm,
                     stride_ym, tok_ptr, emb_ptr, pos_ptr, idx_ptr, scale, stride_em, stride_pm, NORM, ACT, RESIDUAL,
                     BIAS, EMBED, BLOCK_N, BLOCK_K, ROW, False)

@triton.jit
def lin_embed_j(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, tok_ptr, emb_ptr, pos_ptr, idx_ptr,
          N, Kd, eps, stride_xm, stride_wn, stride_rm, stride_ym, scale, stride_em, stride_pm, y_ptr, x_out,
          NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr, EMBED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW: tl.constexpr):
    K._linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, y_ptr, N, Kd, eps, stride_xm, stride_wn, stride_rm,
                     stride_ym, tok_ptr, emb_ptr, pos_ptr, idx_ptr, scale, stride_em, stride_pm, NORM, ACT, RESIDUAL,
                     BIAS, EMBED, BLOCK_N, BLOCK_K, ROW, False)

@triton.jit
def att_j(q_ptr, kv_ptr, index_ptr, mask_ptr, table_ptr, L, scale, stride_qr, stride_kv, stride_kr, stride_kh,
          stride_kl, stride_mr, stride_tr, D, o_ptr, kv_out,
          SELF: tl.constexpr, MASK: tl.constexpr, TABLE: tl.constexpr, HD: tl.constexpr, ALIGN: tl.constexpr,
          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    K._attention_kernel(q_ptr, kv_ptr, kv_ptr + stride_kv, o_ptr, q_ptr + D, index_ptr, mask_ptr, table_ptr, L, scale,
                        stride_qr, stride_kr, stride_kh, stride_kl, stride_kr, stride_kh, stride_kl,
                        D, stride_qr, stride_mr, stride_tr, D, SELF, MASK, TABLE, SELF, False, HD, ALIGN, BLOCK_L,
                        BLOCK_D, False)

@triton.jit
def cross_j(q_ptr, kv_ptr, index_ptr, mask_ptr, table_ptr, L, scale, stride_qr, stride_kv, stride_kr, stride_kh,
            stride_kl, stride_mr, stride_tr, D, o_ptr,
            SELF: tl.constexpr, MASK: tl.constexpr, TABLE: tl.constexpr, HD: tl.constexpr, ALIGN: tl.constexpr,
            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    K._attention_kernel(q_ptr, kv_ptr, kv_ptr + stride_kv, o_ptr, q_ptr, index_ptr, mask_ptr, table_ptr, L, scale,
                        stride_qr, stride_kr, stride_kh, stride_kl, stride_kr, stride_kh, stride_kl,
                        D, 0, stride_mr, stride_tr, D, SELF, MASK, TABLE, False, False, HD, ALIGN, BLOCK_L,
                        BLOCK_D, False)

GPU = "H100"  # linear_config's launch settings for H100s (the sweeps were made there)

def linear(x, w, b=None, norm=None, act=0, residual=None, out_dtype=None, embed=None):
    rows, k = x.shape
    n = w.shape[0]
    cfg = K.linear_config(n, k, GPU)
    dummy = w
    g, beta = norm if norm is not None else (dummy, dummy)
    eps = 1e-5 if norm is not None else 0.0
    tok, emb, pos, idx, scale = embed if embed is not None else (dummy, dummy, dummy, dummy, 1.0)
    args = (x, w, b if b is not None else dummy, residual if residual is not None else dummy, g, beta,
            tok, emb, pos, idx, n, k, float(eps), k, k, n, n, float(scale),
            emb.shape[1] if embed is not None else 0, pos.shape[1] if embed is not None else 0)
    meta = dict(NORM=norm is not None, ACT=act, RESIDUAL=residual is not None, BIAS=b is not None,
                EMBED=embed is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                ROW=triton.next_power_of_2(k) if norm is not None else 1)
    y = jax.ShapeDtypeStruct((rows, n), out_dtype or x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), rows)
    if embed is not None:
        return jt.triton_call(*args, kernel=lin_embed_j, out_shape=(y, jax.ShapeDtypeStruct(x.shape, x.dtype)),
                              grid=grid, input_output_aliases={0: 1}, num_warps=cfg.warps, num_stages=cfg.stages, **meta)
    return jt.triton_call(*args, kernel=lin_j, out_shape=y, grid=grid, num_warps=cfg.warps, num_stages=cfg.stages,
                          **meta)

def attention(q, kv, heads, index=None, mask=None):
    _, rows, _, length, hd = kv.shape
    d = heads * hd
    block, warps = K.attention_config(rows, length, hd)
    self_ = index is not None
    args = (q, kv, index if self_ else q, mask if mask is not None else q, q, length, hd ** -0.5, q.shape[1],
            rows * heads * length * hd, heads * length * hd, length * hd, hd,
            mask.shape[1] if mask is not None else 0, 0, d)
    meta = dict(SELF=self_, MASK=mask is not None, TABLE=False, HD=hd, ALIGN=8 if hd % 8 == 0 else (4 if hd % 4 == 0 else 2),
                BLOCK_L=block, BLOCK_D=triton.next_power_of_2(hd))
    o = jax.ShapeDtypeStruct((rows, d), kv.dtype)
    if self_:
        return jt.triton_call(*args, kernel=att_j, out_shape=(o, jax.ShapeDtypeStruct(kv.shape, kv.dtype)),
                              grid=(rows, heads), input_output_aliases={1: 1}, num_warps=warps, **meta)
    return jt.triton_call(*args, kernel=cross_j, out_shape=o, grid=(rows, heads), num_warps=warps, **meta), kv

def make(rows=1, layers=12, d=1280, heads=32, ffn=5120, vocab=8008, enc_len=40, max_len=128, dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    def w(*s, scale=0.02):
        return jnp.asarray(rng.standard_normal(s, dtype=np.float32) * scale, dtype)
    P = dict(emb=w(vocab, d), pos=w(max_len, d), lm=None, fg=jnp.ones(d, dtype), fb=jnp.zeros(d, dtype), layers=[])
    for _ in range(layers):
        P["layers"].append(dict(qkv=(w(3 * d, d), w(3 * d)), out=(w(d, d), w(d)), cq=(w(d, d), w(d)), co=(w(d, d), w(d)),
                                fc1=(w(ffn, d), w(ffn)), fc2=(w(d, ffn), w(d)),
                                n1=(jnp.ones(d, dtype), jnp.zeros(d, dtype)), n2=(jnp.ones(d, dtype), jnp.zeros(d, dtype)),
                                n3=(jnp.ones(d, dtype), jnp.zeros(d, dtype))))
    hd = d // heads
    caches = [jnp.zeros((2, rows, heads, max_len, hd), dtype) for _ in range(layers)]
    cross = [w(2, rows, heads, enc_len, hd, scale=1.0) for _ in range(layers)]
    mask = jnp.ones((rows, enc_len), jnp.int32)
    return P, caches, cross, mask

def step(P, caches, cross, mask, tokens, index, heads=32):
    d = P["emb"].shape[1]
    rows = tokens.shape[0]
    idx = index.reshape(1).astype(jnp.int32)
    h = jnp.empty((rows, d), P["emb"].dtype)
    new = []
    for i, L in enumerate(P["layers"]):
        if i == 0:
            qkv, h = linear(h, *L["qkv"], norm=L["n1"], embed=(tokens, P["emb"], P["pos"], idx, 1.0))
        else:
            qkv = linear(h, *L["qkv"], norm=L["n1"])
        o, kv = attention(qkv, caches[i], heads, index=idx)
        new.append(kv)
        h = linear(o, *L["out"], residual=h)
        q = linear(h, *L["cq"], norm=L["n2"])
        o, _ = attention(q, cross[i], heads, mask=mask)
        h = linear(o, *L["co"], residual=h)
        f = linear(h, *L["fc1"], norm=L["n3"], act=1)
        h = linear(f, *L["fc2"], residual=h)
    logits = linear(h, P["emb"], norm=(P["fg"], P["fb"]), out_dtype=jnp.float32)
    return logits, new

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target", choices=["legacy", "ffi"], default="legacy")
    args = p.parse_args(argv)
    if args.target == "ffi":
        use_ffi_target()
    rows, steps = args.rows, args.steps
    P, caches, cross, mask = make(rows=rows)

    @jax.jit
    def run(P, caches, cross, mask, tokens):
        def body(i, c):
            tokens, caches, out = c
            logits, caches = step(P, caches, cross, mask, tokens, i)
            t = jnp.argmax(logits, -1).astype(jnp.int32)
            return t, caches, out.at[:, i].set(t)
        out = jnp.zeros((rows, steps), jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (tokens, caches, out))[2]

    tokens = jnp.ones((rows,), jnp.int32)
    t0 = time.perf_counter()
    run(P, caches, cross, mask, tokens).block_until_ready()
    print(f"first call (compiles): {time.perf_counter() - t0:.1f} s", flush=True)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = run(P, caches, cross, mask, tokens).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    print(f"{args.target} | rows {rows} | {best / steps * 1e3:.4f} ms/step | tokens {np.asarray(r)[0, :8]}", flush=True)
    one = jax.jit(lambda P, c, x, m, t: step(P, c, x, m, t, jnp.int32(3))[0])
    one(P, caches, cross, mask, tokens).block_until_ready()
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        one(P, caches, cross, mask, tokens).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    print(f"{args.target} | rows {rows} | one step's call outside a loop: {best * 1e3:.4f} ms", flush=True)


if __name__ == "__main__":
    main()
