"""Pallas kernels for the Flax decode step (`blenderbot_mb.flax.decoding`), each with a jax.numpy twin.

Two kernels cover a decoder layer at one new token per row:

- `linear`: layer norm of the input (optional), the product with a weight, bias, activation (optional) and a
  residual (optional) in one kernel, over a grid of output-column blocks. Decode inputs are a few rows, so
  every program reads them whole and streams its own columns of the weight: the kernel is bound by the
  weight's reads.
- `decode_attention`: one query per row and head against a cache, softmax in float32, over key blocks with
  a running maximum; either the first `index + 1` positions (self-attention over the static cache) or the
  positions a key mask keeps (cross-attention over padded encoder states). Masked keys weigh exactly zero.

On a GPU they lower through Triton (`compiler_params` take num_warps / num_stages); on the CPU they run in
Pallas' interpret mode (chosen from `jax.default_backend()`), which is how the tests check them. The
Triton lowering wants power-of-two block shapes, so ragged edges (rows, head_dim 40, vocabulary 8008) are
loaded under masks, with zeros outside. It has no erf, so the exact GELU uses an approximation of erf
accurate to ~1.5e-7 (Abramowitz and Stegun 7.1.26), within float32 rounding of the model's output.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ACTIVATIONS = ("gelu", "relu")


def interpret_mode() -> bool:
    """Pallas' interpreter where no Triton lowering exists (the CPU)."""
    return jax.default_backend() == "cpu"


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load(ref, mask):
    """ref's block where mask holds, zeros elsewhere (masked lanes are not read)."""
    return plgpu.load(ref, mask=mask, other=0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0)


def _erf(x):
    """erf(x), absolute error < 1.5e-7 (Abramowitz and Stegun 7.1.26): the Triton lowering has no erf."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -y, y)


def _activate(x, activation):
    if activation == "gelu":  # exact (erf) GELU, as the model's "gelu"
        return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))
    if activation == "relu":
        return jnp.maximum(x, 0.0)
    return x


# ---------------------------------------------------------------------- linear
def _linear_kernel(*refs, rows, k_dim, n_dim, block_k, block_n, transposed, eps, activation, has_norm,
                   has_residual, compute_dtype):
    """One program: output columns [j * block_n, (j + 1) * block_n) of every row."""
    x_ref, w_ref, b_ref = refs[:3]
    g_ref, beta_ref = refs[3:5] if has_norm else (None, None)
    r_ref = refs[-2] if has_residual else None
    o_ref = refs[-1]
    vector = rows == 1  # one row (x, residual and output passed as vectors): multiply and sum, no matmul tile
    rows_pad = 1 if vector else max(16, _pow2(rows))
    f32 = jnp.float32
    n0 = pl.program_id(0) * block_n
    cols = n0 + jnp.arange(block_n)
    col_ok = cols < n_dim
    row_ok = jnp.arange(rows_pad) < rows
    exact = jnp.dtype(compute_dtype) == jnp.float32
    precision = lax.Precision.HIGHEST if exact else None

    def x_block(k0):  # the rows' inputs at k0..k0+block_k, float32, zeros outside: [block_k] or [rows_pad, block_k]
        k_ok = k0 + jnp.arange(block_k) < k_dim
        if vector:
            return _load(x_ref.at[pl.ds(k0, block_k)], k_ok).astype(f32), k_ok
        mask = row_ok[:, None] & k_ok[None, :]
        return _load(x_ref.at[pl.ds(0, rows_pad), pl.ds(k0, block_k)], mask).astype(f32), mask

    steps = pl.cdiv(k_dim, block_k)
    if has_norm:  # float32 statistics over the whole row, as flax's LayerNorm (mean of x and of x^2)
        def stats(i, carry):
            x, _ = x_block(i * block_k)
            return carry[0] + jnp.sum(x, axis=-1), carry[1] + jnp.sum(x * x, axis=-1)

        zero = jnp.zeros((), f32) if vector else jnp.zeros((rows_pad,), f32)
        total, total_sq = lax.fori_loop(0, steps, stats, (zero, zero))
        mean = total / k_dim
        rstd = lax.rsqrt(jnp.maximum(total_sq / k_dim - mean * mean, 0.0) + eps)
        if not vector:
            mean, rstd = mean[:, None], rstd[:, None]

    def body(i, acc):
        k0 = i * block_k
        x, mask = x_block(k0)
        if has_norm:
            k_ok = k0 + jnp.arange(block_k) < k_dim
            scale = _load(g_ref.at[pl.ds(k0, block_k)], k_ok).astype(f32)
            shift = _load(beta_ref.at[pl.ds(k0, block_k)], k_ok).astype(f32)
            if not vector:
                scale, shift = scale[None, :], shift[None, :]
            x = jnp.where(mask, (x - mean) * (rstd * scale) + shift, 0.0)
        x = x.astype(compute_dtype)  # the normalized input in the compute dtype, as the module rounds it
        k_ok = k0 + jnp.arange(block_k) < k_dim
        if transposed:  # weight [N, K] (the tied embedding as LM head): tile [block_n, block_k]
            w = _load(w_ref.at[pl.ds(n0, block_n), pl.ds(k0, block_k)], col_ok[:, None] & k_ok[None, :])
        else:  # weight [K, N] (a Flax Dense kernel): tile [block_k, block_n]
            w = _load(w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)], k_ok[:, None] & col_ok[None, :])
        w = w.astype(compute_dtype)
        if vector:
            xw = x.astype(f32)
            if transposed:
                return acc + jnp.sum(w.astype(f32) * xw[None, :], axis=1)
            return acc + jnp.sum(xw[:, None] * w.astype(f32), axis=0)
        dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(x, w, dims, precision=precision, preferred_element_type=f32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_n,) if vector else (rows_pad, block_n), f32))
    acc = acc + _load(b_ref.at[pl.ds(n0, block_n)], col_ok).astype(f32)
    acc = _activate(acc, activation)
    if vector:
        if has_residual:
            acc = acc + _load(r_ref.at[pl.ds(n0, block_n)], col_ok).astype(f32)
        plgpu.store(o_ref.at[pl.ds(n0, block_n)], acc.astype(o_ref.dtype), mask=col_ok)
        return
    mask = row_ok[:, None] & col_ok[None, :]
    out_at = (pl.ds(0, rows_pad), pl.ds(n0, block_n))
    if has_residual:
        acc = acc + _load(r_ref.at[out_at], mask).astype(f32)
    plgpu.store(o_ref.at[out_at], acc.astype(o_ref.dtype), mask=mask)


def linear(x, weight, bias, *, norm=None, activation=None, residual=None, transposed=False, out_dtype=None,
           block_n=None, block_k=None, num_warps=4, num_stages=2, interpret=None):
    """`activation(layer_norm(x) @ weight + bias) + residual` in one kernel: x [rows, K] -> [rows, N].

    weight: [K, N] (Flax's Dense kernel), or [N, K] with `transposed=True` (the tied embedding as LM head);
    bias [N]. norm: None or (scale [K], bias [K], eps): float32 statistics, the normalized x rounded to
    x's dtype (the compute dtype) before the product, as the module. activation: None, "gelu" (exact) or
    "relu". residual: None or [rows, N]. Products accumulate in float32 (exact float32 products, no TF32,
    when x is float32); bias, activation and residual are added in float32, the output rounded once to
    `out_dtype` (default x's dtype). Block sizes are powers of two (defaults: 32 columns and 256 of K for
    one row, 64 and 64 otherwise); `num_warps` / `num_stages` go to the Triton compiler.
    """
    rows, k_dim = x.shape
    n_dim = weight.shape[0] if transposed else weight.shape[1]
    if weight.shape != ((n_dim, k_dim) if transposed else (k_dim, n_dim)):
        raise ValueError(f"linear: weight {weight.shape} does not match input {x.shape} (transposed={transposed})")
    if activation not in (None, *ACTIVATIONS):
        raise ValueError(f"linear: activation {activation!r} is not one of {ACTIVATIONS}")
    block_n = block_n or min(32 if rows == 1 else 64, _pow2(n_dim))
    block_k = block_k or min(256 if rows == 1 else 64, _pow2(k_dim))
    vector = rows == 1
    operands = [x[0] if vector else x, weight, bias]
    if norm is not None:
        operands += [norm[0], norm[1]]
    if residual is not None:
        operands.append(residual[0] if vector else residual)
    kernel = partial(_linear_kernel, rows=rows, k_dim=k_dim, n_dim=n_dim, block_k=block_k, block_n=block_n,
                     transposed=transposed, eps=None if norm is None else float(norm[2]), activation=activation,
                     has_norm=norm is not None, has_residual=residual is not None, compute_dtype=x.dtype)
    out = pl.pallas_call(
        kernel, grid=(pl.cdiv(n_dim, block_n),),
        out_shape=jax.ShapeDtypeStruct((n_dim,) if vector else (rows, n_dim), out_dtype or x.dtype),
        compiler_params=_params(num_warps, num_stages), name="linear",
        interpret=interpret_mode() if interpret is None else interpret,
    )(*operands)
    return out.reshape(rows, n_dim)


def linear_reference(x, weight, bias, *, norm=None, activation=None, residual=None, transposed=False,
                     out_dtype=None):
    """`linear` in jax.numpy (float32 accumulation, the same roundings), for tests and benchmarks."""
    f32 = jnp.float32
    h = x.astype(f32)
    if norm is not None:
        scale, shift, eps = norm
        mean = h.mean(-1, keepdims=True)
        var = jnp.maximum((h * h).mean(-1, keepdims=True) - mean * mean, 0.0)
        h = (h - mean) * (lax.rsqrt(var + eps) * scale.astype(f32)) + shift.astype(f32)
    h = h.astype(x.dtype)
    w = (weight.T if transposed else weight).astype(x.dtype)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = jnp.dot(h, w, precision=precision, preferred_element_type=f32) + bias.astype(f32)
    if activation == "gelu":
        out = jax.nn.gelu(out, approximate=False)
    elif activation == "relu":
        out = jax.nn.relu(out)
    if residual is not None:
        out = out + residual.astype(f32)
    return out.astype(out_dtype or x.dtype)


# ---------------------------------------------------------------------- decode attention
def _attention_kernel(*refs, by_length, seq_len, head_dim, block_l, scale):
    """One program: row r, head h. Keys in blocks of block_l, softmax with a running maximum (float32)."""
    valid_ref, q_ref, k_ref, v_ref, o_ref = refs
    r, h = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32
    hd_pad = _pow2(head_dim)
    d_ok = jnp.arange(hd_pad) < head_dim
    q = _load(q_ref.at[r, h, pl.ds(0, hd_pad)], d_ok).astype(f32) * scale  # [hd_pad]
    if by_length:  # keys 0..index: only the blocks holding them are read
        length = valid_ref[()] + 1
        steps = pl.cdiv(jnp.minimum(length, seq_len), block_l)
    else:
        length = seq_len
        steps = pl.cdiv(seq_len, block_l)

    def body(i, carry):
        m, total, acc = carry
        pos = i * block_l + jnp.arange(block_l)
        ok = pos < length
        if not by_length:
            ok = ok & (_load(valid_ref.at[r, pl.ds(i * block_l, block_l)], pos < seq_len) != 0)
        tile = ok[:, None] & d_ok[None, :]
        k = _load(k_ref.at[r, h, pl.ds(i * block_l, block_l), pl.ds(0, hd_pad)], tile).astype(f32)
        s = jnp.sum(k * q[None, :], axis=1)  # [block_l]
        m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, jnp.finfo(f32).min)))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)  # masked keys: exactly zero
        correction = jnp.exp(m - m_new)
        v = _load(v_ref.at[r, h, pl.ds(i * block_l, block_l), pl.ds(0, hd_pad)], tile).astype(f32)
        return m_new, total * correction + jnp.sum(p), acc * correction + jnp.sum(p[:, None] * v, axis=0)

    init = (jnp.full((), jnp.finfo(f32).min, f32), jnp.zeros((), f32), jnp.zeros((hd_pad,), f32))
    _, total, acc = lax.fori_loop(0, steps, body, init)
    plgpu.store(o_ref.at[r, h, pl.ds(0, hd_pad)], (acc / total).astype(o_ref.dtype), mask=d_ok)


def decode_attention(q, k, v, *, valid, block_l=64, num_warps=2, num_stages=2, interpret=None):
    """Attention of one query per row: q [rows, heads, hd], k/v [rows, heads, L, hd] -> [rows, heads, hd].

    valid: a scalar index (traced or not: keys at positions <= index count, as the causal self-attention
    over a cache written up to index), or a key mask [rows, L] (nonzero counts: the encoder's attention
    mask for cross-attention). Scores q . k * hd**-0.5 and the softmax in float32, masked keys weigh
    exactly zero; the output in q's dtype. head_dim is padded to a power of two inside the kernel.
    """
    rows, heads, head_dim = q.shape
    seq_len = k.shape[2]
    if k.shape != (rows, heads, seq_len, head_dim) or v.shape != k.shape:
        raise ValueError(f"decode_attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
    valid = jnp.asarray(valid)
    by_length = valid.ndim == 0
    if by_length:
        valid = valid.astype(jnp.int32)
    elif valid.shape != (rows, seq_len):
        raise ValueError(f"decode_attention: key mask {valid.shape}, expected {(rows, seq_len)}")
    else:
        valid = valid.astype(jnp.int32)
    kernel = partial(_attention_kernel, by_length=by_length, seq_len=seq_len, head_dim=head_dim,
                     block_l=min(block_l, _pow2(seq_len)), scale=head_dim**-0.5)
    return pl.pallas_call(
        kernel, grid=(rows, heads), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(num_warps, num_stages), name="decode_attention",
        interpret=interpret_mode() if interpret is None else interpret,
    )(valid, q, k, v)


def decode_attention_reference(q, k, v, *, valid):
    """`decode_attention` in jax.numpy (float32 scores and softmax), for tests and benchmarks."""
    f32 = jnp.float32
    valid = jnp.asarray(valid)
    seq_len = k.shape[2]
    keep = jnp.arange(seq_len)[None, :] <= valid if valid.ndim == 0 else valid != 0  # [1 or rows, L]
    s = jnp.einsum("bhd,bhkd->bhk", q.astype(f32) * q.shape[-1] ** -0.5, k.astype(f32),
                   precision=lax.Precision.HIGHEST)
    w = jax.nn.softmax(jnp.where(keep[:, None, :], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhk,bhkd->bhd", w, v.astype(f32), precision=lax.Precision.HIGHEST).astype(q.dtype)
