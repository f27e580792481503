"""The decoder step of several rows (beam search, batches) as one persistent Triton kernel per decoder layer.

A step of 10 or 32 rows of the 400M model is ~73 products of a few MB each; as cuBLAS kernels each costs ~5 us
whatever its bytes (docs/benchmarks.md), ~0.5 ms a step on an H100 or H200. Here each decoder layer is one
kernel whose programs all stay resident and run the layer's stages one after another, a grid-wide barrier
(a counter in global memory) between them:

    q/k/v product (the layer norm in it; k and v written into the cache) | self-attention | out product + residual
    | cross q product (norm) | cross-attention | cross out product + residual | fc1 (norm, activation) | fc2 + residual

- Products: tiles of BLOCK_N weight rows by a part of K, the rows (padded to 16 or 32) multiplied on the tensor
  cores. Where K is split over parts, each part writes its sums, and the part that finishes last (an atomic
  count per block of outputs) adds them in the parts' order and writes the epilogue (bias, activation,
  residual): the sums' order never varies, so runs give the same tokens.
- Layer norms: each program makes the statistics of the rows it multiplies (float32, two passes), the normed
  rows rounded to the weights' dtype as the model's norm rounds them.
- Attention: one (row, head) per program at a time, online softmax in float32; the self-attention reads each
  position from the cache row the beam table names (beam search reorders the table, not the cache).
- Before each barrier a program asks the L2 cache for the weight tiles of its next product (`prefetch.global.L2`),
  so they arrive while it waits.
- The next layer's kernel is launched with programmatic dependent launch once every program has crossed the
  last barrier (not before: its programs could take the SMs that programs of this one still need).

The head (the final norm, the product with the embeddings, the logits' bias, float32 logits) is one more kernel
of the same products. On the CPU (Triton's interpreter, which runs programs one after another: a program
waiting at a barrier would wait forever) each stage is its own launch of the same kernel, with no barrier.
"""

from __future__ import annotations

import functools

import torch

from .kernels import ACTIVATIONS, _alignment, _pdl, triton

if triton is not None:
    import triton.language as tl

ENABLED = True  # generate(kernels=True) of 2 to MAX_ROWS rows runs this step (benchmarks turn it off)
PROGRAMS_PER_SM = 2  # resident programs per SM (every program must be resident at once: they wait for each other)
WARPS = 4
MAX_ROWS = 32
BLOCK_N = 32  # a weight tile: BLOCK_N outputs by BLOCK_K inputs (powers of 2; tests take smaller ones)
BLOCK_K = 256
MAX_ROUNDS = 8  # at most this many tiles a program per product
RUN = 255  # the stages a layer's kernel runs, one bit each (benchmarks time parts of the step; barriers stay)
BLOCK_L = 32  # positions per block of the attention
HEADS = 1  # at most this many heads of a row per attention item


def _rounds(n: int, k: int, programs: int) -> int:
    """Tiles a program takes of an [n, k] product."""
    return triton.cdiv(triton.cdiv(n, BLOCK_N) * triton.cdiv(k, BLOCK_K), programs)


def fits(model, rows: int) -> bool:
    """Whether this kernel runs the step of `rows` rows of this model: 2 to MAX_ROWS rows, biases in every
    Linear layer, an activation the kernel has, a float16/bfloat16/float32 model, products of at most MAX_ROUNDS
    tiles a program."""
    dec = model.get_decoder()
    layer = dec.layers[0]
    linears = (layer.self_attn.q_proj, layer.self_attn.out_proj, layer.fc1, layer.fc2)
    if not (triton is not None and 1 < rows <= MAX_ROWS and model.config.activation_function in ACTIVATIONS
            and all(m.bias is not None for m in linears)
            and model.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    d, ffn, programs = model.config.d_model, layer.fc1.out_features, _programs(model.device)
    return (max(_rounds(3 * d, d, programs), _rounds(ffn, d, programs), _rounds(d, ffn, programs)) <= MAX_ROUNDS
            and triton.cdiv(d, BLOCK_N) <= STATS_BLOCKS)


STATS_BLOCKS = 256  # (kernel constants, below: the layer norms' row sums per block of columns)
STATS_ROWS = 32

if triton is not None:

    @triton.jit
    def _sync(counter_ptr, target, BARRIER: tl.constexpr):
        """Wait until `target` arrivals are counted (every program's, once per barrier so far)."""
        if BARRIER:
            tl.debug_barrier()  # this program's stores are done
            tl.atomic_add(counter_ptr, 1, sem="release")
            while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
                pass
            tl.debug_barrier()

    @triton.jit
    def _stats(x_ptr, stride_x, rm, keep_m, K: tl.constexpr, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Each row's mean and 1 / std over K values (float32), in one pass over the row with every block's
        read issued at once: sums of the differences to the row's first value (as exact as two passes for
        rows whose mean is far from 0)."""
        first = tl.load(x_ptr + rm * stride_x, mask=keep_m, other=0.0, cache_modifier=".cg").to(tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            keep = keep_m[:, None] & (rk < K)[None, :]
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=keep, other=0.0, cache_modifier=".cg")
            x = tl.where(keep, x.to(tl.float32) - first[:, None], 0.0)
            total += tl.sum(x, axis=1)
            squares += tl.sum(x * x, axis=1)
        shift = total / K
        return first + shift, 1.0 / tl.sqrt(tl.maximum(squares / K - shift * shift, 0.0) + eps)

    _STATS_ROWS = tl.constexpr(STATS_ROWS)  # the rows' sums for the layer norms: [2, rows, blocks] float32
    _STATS_BLOCKS = tl.constexpr(STATS_BLOCKS)  # (per block of columns of the product that wrote the rows)

    @triton.jit
    def _tile(w_ptr, t, tiles, N, K, parts, BLOCK_N: tl.constexpr, KP: tl.constexpr):
        """Tile t's weights [BLOCK_N, KP] (nothing read past the last tile)."""
        rn = (t // parts) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.where(t < tiles, rn, N)  # past the last tile: no row kept
        rk = (t % parts) * KP + tl.arange(0, KP)
        keep = (rn < N)[:, None] & (rk < K)[None, :]
        return tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=keep, other=0.0)

    @triton.jit
    def _row_stats(stats_ptr, x_ptr, rm, keep_m, K, eps, first, D: tl.constexpr, SB, SBP: tl.constexpr,
                   BLOCK_M: tl.constexpr):
        """Each row's mean and 1 / std for the layer norm: from the sums the product before wrote per block of
        columns (SB blocks), or (`first`: the embedded rows) from the rows themselves."""
        if first:
            mean, rstd = _stats(x_ptr, D, rm, keep_m, D, eps, BLOCK_M, 128)
        else:
            rb = tl.arange(0, SBP)
            keep = keep_m[:, None] & (rb < SB)[None, :]
            at = stats_ptr + rm[:, None] * _STATS_BLOCKS + rb[None, :]
            total = tl.sum(tl.load(at, mask=keep, other=0.0, cache_modifier=".cg"), axis=1)
            squares = tl.sum(tl.load(at + _STATS_ROWS * _STATS_BLOCKS, mask=keep, other=0.0, cache_modifier=".cg"),
                             axis=1)
            mean = total / K
            rstd = 1.0 / tl.sqrt(tl.maximum(squares / K - mean * mean, 0.0) + eps)
        return mean, rstd

    @triton.jit
    def _epilogue(acc, block, b_ptr, y_ptr, stride_y, stats_ptr, N, rm, keep_m,
                  kv_ptr, stride_kv, stride_kr, stride_kh, stride_kl, index, D, bias, act, out, stats,
                  HD: tl.constexpr, BLOCK_N: tl.constexpr):
        """Bias, activation (1 gelu, 2 relu), then out 0: y written; 1: added to the residual y holds, and with
        `stats` each row's sum and sum of squares over these columns written for the next layer norm; 2: the
        q/k/v product, its first D columns written to y, the keys and values into the cache at the step index."""
        rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = rn < N
        both = keep_m[:, None] & keep_n[None, :]
        y = acc
        if bias:
            y += tl.load(b_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)[None, :]
        if act == 1:
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif act == 2:
            y = tl.maximum(y, 0.0)
        if out == 2:
            which = rn // D  # 0: q, 1: k, 2: v
            within = rn % D
            kv_at = (kv_ptr + (which - 1).to(tl.int64)[None, :] * stride_kv + rm[:, None] * stride_kr
                     + (within // HD)[None, :] * stride_kh + index * stride_kl + (within % HD)[None, :])
            tl.store(kv_at, y.to(kv_ptr.dtype.element_ty), mask=both & (which > 0)[None, :])
            tl.store(y_ptr + rm[:, None] * D + within[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=both & (which == 0)[None, :])
        else:
            at = y_ptr + rm[:, None] * stride_y + rn[None, :]
            if out == 1:
                y += tl.load(at, mask=both, other=0.0, cache_modifier=".cg").to(tl.float32)
            rounded = y.to(y_ptr.dtype.element_ty)
            tl.store(at, rounded, mask=both)
            if stats:  # of the rounded values, as the next layer norm reads them
                z = tl.where(both, rounded.to(tl.float32), 0.0)
                sums = stats_ptr + rm * _STATS_BLOCKS + block
                tl.store(sums, tl.sum(z, axis=1), mask=keep_m)
                tl.store(sums + _STATS_ROWS * _STATS_BLOCKS, tl.sum(z * z, axis=1), mask=keep_m)

    @triton.jit
    def _product(w, w_ptr, x_ptr, b_ptr, g_ptr, beta_ptr, eps, y_ptr, part_ptr, count_ptr, stats_ptr, M, N, K,
                 pid, G, kv_ptr, stride_kv, stride_kr, stride_kh, stride_kl, index, D, SB,
                 norm, bias, act, out, stats, first, DC: tl.constexpr, HD: tl.constexpr,
                 SBP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
                 MAXR: tl.constexpr, PRECISION: tl.constexpr):
        """y = epilogue(norm(x) @ w.T + b), x [M, K] and y [M, N] of contiguous rows, over this program's tiles
        (pid, pid + G, ...: at most MAXR); `w` is the first one's weights, read before the barrier this product
        waited at, each later tile's read while the one before is multiplied. Where K is in parts, each part's
        sums are written; once all of this program's are, the part that finishes a block of outputs last (an
        atomic count) adds the block's parts in a fixed order and writes the epilogue. The flags are run-time
        values: the kernel holds this code once for all of a layer's products."""
        rm = tl.arange(0, BLOCK_M)
        keep_m = rm < M
        parts = tl.cdiv(K, KP)
        tiles = tl.cdiv(N, BLOCK_N) * parts
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = mean
        if norm:
            mean, rstd = _row_stats(stats_ptr, x_ptr, rm, keep_m, K, eps, first, DC, SB, SBP, BLOCK_M)
        for t in range(pid, tiles, G):
            w_next = _tile(w_ptr, t + G, tiles, N, K, parts, BLOCK_N, KP)
            rk = (t % parts) * KP + tl.arange(0, KP)
            keep_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=keep_m[:, None] & keep_k[None, :], other=0.0,
                        cache_modifier=".cg")
            if norm:
                g = tl.load(g_ptr + rk, mask=keep_k, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + rk, mask=keep_k, other=0.0).to(tl.float32)
                x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]).to(w.dtype)
            acc = tl.dot(x.to(w.dtype), tl.trans(w), input_precision=PRECISION)
            if parts > 1:
                rn = (t // parts) * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.store(part_ptr + (t % parts) * BLOCK_M * N + rm[:, None] * N + rn[None, :], acc,
                         mask=keep_m[:, None] & (rn < N)[None, :])
            else:
                _epilogue(acc, t, b_ptr, y_ptr, N, stats_ptr, N, rm, keep_m, kv_ptr, stride_kv, stride_kr,
                          stride_kh, stride_kl, index, D, bias, act, out, stats, HD, BLOCK_N)
            w = w_next
        if parts > 1:
            tl.debug_barrier()  # this program's parts are written
            rr = tl.arange(0, MAXR)
            mine = pid + rr * G
            done = tl.atomic_add(count_ptr + mine // parts, 1, mask=mine < tiles, sem="acq_rel")  # all at once
            for r in range(0, MAXR):
                t = pid + r * G
                if t < tiles:
                    if tl.sum(tl.where(rr == r, done, 0)) == parts - 1:  # the block's last part: add them all
                        block = t // parts
                        rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
                        both = keep_m[:, None] & (rn < N)[None, :]
                        sums = rm[:, None] * N + rn[None, :]
                        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                        rp = tl.arange(0, 8)
                        for p0 in range(0, parts, 8):  # 8 parts a read, added in a fixed order
                            chunk = tl.load(part_ptr + (p0 + rp)[:, None, None] * (BLOCK_M * N) + sums[None, :, :],
                                            mask=((p0 + rp) < parts)[:, None, None] & both[None, :, :], other=0.0,
                                            cache_modifier=".cg")
                            acc += tl.sum(chunk, axis=0)
                        tl.atomic_xchg(count_ptr + block, 0)  # for the next product
                        _epilogue(acc, block, b_ptr, y_ptr, N, stats_ptr, N, rm, keep_m, kv_ptr, stride_kv,
                                  stride_kr, stride_kh, stride_kl, index, D, bias, act, out, stats, HD, BLOCK_N)

    @triton.jit
    def _attend(q_ptr, stride_q, k_ptr, v_ptr, stride_kr, stride_kh, stride_kl, stride_vr, stride_vh, stride_vl,
                o_ptr, stride_o, n, mask_ptr, stride_mr, table_ptr, stride_tr, M, H: tl.constexpr, pid, G, scale,
                MASK: tl.constexpr, TABLE: tl.constexpr, HD: tl.constexpr, ALIGN: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HG: tl.constexpr):
        """One query per row and head over n positions, HG heads of a row at a time ([HG, BLOCK_L, BLOCK_D]
        blocks), this program's (row, heads) items one after another; online softmax in float32."""
        rd = tl.arange(0, BLOCK_D)
        keep_d = rd < HD
        rl = tl.arange(0, BLOCK_L)
        groups: tl.constexpr = H // HG
        for item in range(pid, M * groups, G):
            row = item // groups
            heads = (item % groups) * HG + tl.arange(0, HG)  # [HG]
            q = tl.load(q_ptr + row * stride_q + heads[:, None] * HD + rd[None, :], mask=keep_d[None, :], other=0.0,
                        cache_modifier=".cg")
            q = q.to(tl.float32) * scale  # [HG, BLOCK_D]
            best = tl.full([HG], -1.0e30, tl.float32)
            total = tl.zeros([HG], dtype=tl.float32)
            acc = tl.zeros([HG, BLOCK_D], dtype=tl.float32)
            for l0 in range(0, n, BLOCK_L):
                pos = l0 + rl
                keep = pos < n
                if MASK:
                    keep = keep & (tl.load(mask_ptr + row * stride_mr + pos, mask=keep, other=0) != 0)
                if TABLE:
                    src = tl.load(table_ptr + row * stride_tr + pos, mask=keep, other=0).to(tl.int64)
                else:
                    src = row.to(tl.int64) + 0 * pos
                k_at = (tl.multiple_of(src * stride_kr + pos * stride_kl, ALIGN)[None, :]
                        + tl.multiple_of(heads * stride_kh, ALIGN)[:, None])
                v_at = (tl.multiple_of(src * stride_vr + pos * stride_vl, ALIGN)[None, :]
                        + tl.multiple_of(heads * stride_vh, ALIGN)[:, None])
                both = keep[None, :, None] & keep_d[None, None, :]
                k = tl.load(k_ptr + k_at[:, :, None] + rd[None, None, :], mask=both, other=0.0, cache_modifier=".cg")
                v = tl.load(v_ptr + v_at[:, :, None] + rd[None, None, :], mask=both, other=0.0, cache_modifier=".cg")
                s = tl.where(keep[None, :], tl.sum(k.to(tl.float32) * q[:, None, :], axis=2), float("-inf"))
                top = tl.maximum(best, tl.max(s, axis=1))  # [HG]
                p = tl.exp(s - top[:, None])
                alpha = tl.exp(best - top)
                total = total * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.sum(tl.where(keep[None, :, None], p[:, :, None] * v.to(tl.float32),
                                                             0.0), axis=1)
                best = top
            tl.store(o_ptr + row * stride_o + heads[:, None] * HD + rd[None, :],
                     (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=keep_d[None, :])

    @triton.jit
    def _select(s, x_ptr, q_ptr, ctx_ptr, f_ptr, g1_ptr, beta1_ptr, w_qkv, b_qkv, w_o, b_o, g2_ptr, beta2_ptr, w_cq,
                b_cq, w_co, b_co, g3_ptr, beta3_ptr, w_1, b_1, w_2, b_2, D, F, ACT):
        """Stage s's product: (weights, bias, norm weight, norm bias, x, y, N, K, norm, activation, out, stats)."""
        if s == 0:
            r = w_qkv, b_qkv, g1_ptr, beta1_ptr, x_ptr, q_ptr, 3 * D, D, 1, 0, 2, 0
        elif s == 2:
            r = w_o, b_o, g1_ptr, beta1_ptr, ctx_ptr, x_ptr, D, D, 0, 0, 1, 1
        elif s == 3:
            r = w_cq, b_cq, g2_ptr, beta2_ptr, x_ptr, q_ptr, D, D, 1, 0, 0, 0
        elif s == 5:
            r = w_co, b_co, g2_ptr, beta2_ptr, ctx_ptr, x_ptr, D, D, 0, 0, 1, 1
        elif s == 6:
            r = w_1, b_1, g3_ptr, beta3_ptr, x_ptr, f_ptr, F, D, 1, ACT, 0, 0
        else:
            r = w_2, b_2, g3_ptr, beta3_ptr, f_ptr, x_ptr, D, F, 0, 0, 1, 1
        return r

    @triton.jit
    def _layer_kernel(x_ptr, q_ptr, ctx_ptr, f_ptr, part_ptr, count_ptr, stats_ptr, counter_ptr, index_ptr,
                      kv_ptr, stride_kv, stride_kr, stride_kh, stride_kl, table_ptr, stride_tr,
                      ck_ptr, cv_ptr, stride_ckr, stride_ckh, stride_ckl, stride_cvr, stride_cvh, stride_cvl,
                      mask_ptr, stride_mr, S,
                      g1_ptr, beta1_ptr, w_qkv, b_qkv, w_o, b_o, g2_ptr, beta2_ptr, w_cq, b_cq, w_co, b_co,
                      g3_ptr, beta3_ptr, w_1, b_1, w_2, b_2, eps, scale, M, F, SB, ACT,
                      D: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, FIRST: tl.constexpr,
                      CROSS: tl.constexpr, MASK: tl.constexpr, TABLE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr, MAXR: tl.constexpr,
                      SBP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HG: tl.constexpr,
                      ALIGN: tl.constexpr, CALIGN: tl.constexpr, STAGE: tl.constexpr, RUN: tl.constexpr,
                      PRECISION: tl.constexpr, PDL: tl.constexpr):
        """One decoder layer over M rows: its stages in a run-time loop, a barrier between them, each product's
        first weight tile read before the barrier it waits at. STAGE -1: all stages; else that stage alone."""
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        ALL: tl.constexpr = STAGE < 0
        first = 0 if ALL else STAGE
        stop = 8 if ALL else STAGE + 1
        w_ptr, b_ptr, g_ptr, beta_ptr, x_in, y_out, N, K, norm, act, out, stats = _select(
            first, x_ptr, q_ptr, ctx_ptr, f_ptr, g1_ptr, beta1_ptr, w_qkv, b_qkv, w_o, b_o, g2_ptr, beta2_ptr, w_cq,
            b_cq, w_co, b_co, g3_ptr, beta3_ptr, w_1, b_1, w_2, b_2, D, F, ACT)
        parts = tl.cdiv(K, KP)
        w = _tile(w_ptr, pid, tl.cdiv(N, BLOCK_N) * parts, N, K, parts, BLOCK_N, KP)
        if PDL:  # the layer before has finished (its results are visible)
            tl.extra.cuda.gdc_wait()
        index = tl.load(index_ptr)
        if TABLE and first == 0 and pid == 0:  # each row's new position is read from its own cache row
            r = tl.arange(0, BLOCK_M)
            tl.store(table_ptr + r * stride_tr + index, r.to(table_ptr.dtype.element_ty), mask=r < M)
        crossed = 0
        for s in range(first, stop):
            if CROSS or s < 3 or s > 5:
                if ALL and s == 7 and PDL:  # every program has crossed the last barrier: the next kernel may
                    tl.extra.cuda.gdc_launch_dependents()  # take their places
                if ((RUN >> s) & 1) != 0 or not ALL:
                    if s == 1:
                        _attend(q_ptr, D, kv_ptr, kv_ptr + stride_kv, stride_kr, stride_kh, stride_kl, stride_kr,
                                stride_kh, stride_kl, ctx_ptr, D, index + 1, mask_ptr, stride_mr, table_ptr,
                                stride_tr, M, H, pid, G, scale, False, TABLE, HD, ALIGN, BLOCK_D, BLOCK_L, HG)
                    elif s == 4:
                        _attend(q_ptr, D, ck_ptr, cv_ptr, stride_ckr, stride_ckh, stride_ckl, stride_cvr,
                                stride_cvh, stride_cvl, ctx_ptr, D, S, mask_ptr, stride_mr, table_ptr, stride_tr,
                                M, H, pid, G, scale, MASK, False, HD, CALIGN, BLOCK_D, BLOCK_L, HG)
                    else:
                        _product(w, w_ptr, x_in, b_ptr, g_ptr, beta_ptr, eps, y_out, part_ptr, count_ptr, stats_ptr,
                                 M, N, K, pid, G, kv_ptr, stride_kv, stride_kr, stride_kh, stride_kl, index, D, SB,
                                 norm, 1, act, out, stats, FIRST and s == 0, D, HD, SBP, BLOCK_M, BLOCK_N, KP, MAXR,
                                 PRECISION)
                if ALL and s < 7:
                    nxt = s + 1 if s != 0 else 2  # the next product stage: its first tile before the barrier
                    if nxt == 4 or (not CROSS and nxt == 3):
                        nxt = 5 if CROSS else 6
                    w_ptr, b_ptr, g_ptr, beta_ptr, x_in, y_out, N, K, norm, act, out, stats = _select(
                        nxt, x_ptr, q_ptr, ctx_ptr, f_ptr, g1_ptr, beta1_ptr, w_qkv, b_qkv, w_o, b_o, g2_ptr,
                        beta2_ptr, w_cq, b_cq, w_co, b_co, g3_ptr, beta3_ptr, w_1, b_1, w_2, b_2, D, F, ACT)
                    parts = tl.cdiv(K, KP)
                    w = _tile(w_ptr, pid, tl.cdiv(N, BLOCK_N) * parts, N, K, parts, BLOCK_N, KP)
                    crossed += 1
                    _sync(counter_ptr, crossed * G, True)

    @triton.jit
    def _head_kernel(x_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, eps, y_ptr, part_ptr, count_ptr, stats_ptr, M, N, K,
                     SB, BIAS, D: tl.constexpr, HD: tl.constexpr, SBP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, KP: tl.constexpr, MAXR: tl.constexpr, PRECISION: tl.constexpr,
                     PDL: tl.constexpr):
        """The final layer norm and the product with the output embeddings (+ the logits' bias): float32."""
        pid, G = tl.program_id(0), tl.num_programs(0)
        parts = tl.cdiv(K, KP)
        w = _tile(w_ptr, pid, tl.cdiv(N, BLOCK_N) * parts, N, K, parts, BLOCK_N, KP)
        if PDL:
            tl.extra.cuda.gdc_wait()
        _product(w, w_ptr, x_ptr, b_ptr, g_ptr, beta_ptr, eps, y_ptr, part_ptr, count_ptr, stats_ptr, M, N, K,
                 pid, G, x_ptr, 0, 0, 0, 0, 0, K, SB, 1, BIAS, 0, 0, 0, False, D, HD, SBP, BLOCK_M, BLOCK_N, KP,
                 MAXR, PRECISION)


@functools.cache
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so that each runs several tiles and items
    return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM


_checked: set = set()


def _check_resident(kernel, device, programs: int) -> None:
    """Refuses a compiled layer kernel whose programs can't all be resident at once (they would wait for each
    other forever): its registers and shared memory per program against an SM's."""
    key = (id(kernel), programs)
    if key in _checked:
        return
    kernel._init_handles()
    props = torch.cuda.get_device_properties(device)
    per_sm = min(65536 // (max(kernel.n_regs, 1) * 32 * WARPS),
                 props.shared_memory_per_multiprocessor // max(kernel.metadata.shared, 1),
                 props.max_threads_per_multi_processor // (32 * WARPS))
    if per_sm * props.multi_processor_count < programs:
        raise RuntimeError(f"the persistent layer kernel needs {programs} resident programs; this GPU holds "
                           f"{per_sm} an SM of it ({kernel.n_regs} registers a thread, {kernel.metadata.shared} "
                           f"bytes of shared memory): lower persistent.PROGRAMS_PER_SM")
    _checked.add(key)


def persistent_logits(model, tokens, cache, encoder_mask, weights):
    """decoding.fused_logits' step for 2 to MAX_ROWS rows, written as one persistent kernel per decoder layer
    and one kernel for the head; float32 logits [rows, vocab]. cache: a KVCache with per-layer buffers
    [2, rows, heads, max_length, head_dim], a device index [1] and (beam search) a table of cache rows;
    weights: decoding.fused_weights()'."""
    dec = model.get_decoder()
    rows = tokens.shape[0]
    index = cache.index
    _, _, heads, length, hd = cache.buffers[0].shape
    d = heads * hd
    ffn = dec.layers[0].fc1.out_features
    device = tokens.device
    dtype = dec.embed_tokens.weight.dtype
    programs = _programs(device)
    interpreted = device.type != "cuda"
    block_m = 16 if rows <= 16 else 32
    precision = "ieee" if dtype == torch.float32 else "tf32"
    x = (dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(index)).contiguous()  # [rows, d]
    q = torch.empty(rows, d, dtype=dtype, device=device)
    ctx = torch.empty(rows, d, dtype=dtype, device=device)
    f = torch.empty(rows, ffn, dtype=dtype, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    widest = max(3 * d, ffn, vocab)
    parts = torch.empty(triton.cdiv(max(d, ffn), BLOCK_K), block_m, widest, dtype=torch.float32, device=device)
    stats = torch.empty(2, STATS_ROWS, STATS_BLOCKS, dtype=torch.float32, device=device)
    counts = torch.zeros(len(dec.layers) + triton.cdiv(widest, BLOCK_N), dtype=torch.int32, device=device)
    count = counts[len(dec.layers):]
    table = cache.table
    layers, _ = weights
    pdl = _pdl(x)
    blocks = triton.cdiv(d, BLOCK_N)
    rounds = max(_rounds(3 * d, d, programs), _rounds(ffn, d, programs), _rounds(d, ffn, programs))
    for i, layer in enumerate(dec.layers):
        w = layers[i]
        kv = cache.buffers[i]
        cross = cache.cross_kv[i]
        ck, cv = cross if cross is not None else (kv[0], kv[1])
        mask = encoder_mask if encoder_mask is not None else x
        args = (x, q, ctx, f, parts, count, stats, counts[i:], index,
                kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
                table if table is not None else counts, table.stride(0) if table is not None else 0,
                ck, cv, ck.stride(0), ck.stride(1), ck.stride(2), cv.stride(0), cv.stride(1), cv.stride(2),
                mask, mask.stride(0), ck.shape[2] if cross is not None else 0,
                layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias, *w["qkv"], *w["out"],
                layer.encoder_attn_layer_norm.weight if cross is not None else x,
                layer.encoder_attn_layer_norm.bias if cross is not None else x,
                *(w["cross_q"] if cross is not None else (x, x)), *(w["cross_out"] if cross is not None else (x, x)),
                layer.final_layer_norm.weight, layer.final_layer_norm.bias, *w["fc1"], *w["fc2"],
                layer.final_layer_norm.eps, hd ** -0.5, rows, ffn, blocks, ACTIVATIONS[model.config.activation_function])
        constants = dict(
            D=d, H=heads, HD=hd, FIRST=i == 0, CROSS=cross is not None,
            MASK=encoder_mask is not None and cross is not None, TABLE=table is not None, BLOCK_M=block_m,
            BLOCK_N=BLOCK_N, KP=BLOCK_K, MAXR=triton.next_power_of_2(rounds), SBP=triton.next_power_of_2(blocks),
            BLOCK_D=triton.next_power_of_2(hd), BLOCK_L=BLOCK_L, HG=_head_group(heads, hd),
            ALIGN=_alignment(kv[0], kv[1]), CALIGN=_alignment(ck, cv), PRECISION=precision)
        if interpreted:  # stage by stage: the interpreter runs programs one after another
            for stage in range(8):
                if cross is not None or stage < 3 or stage > 5:
                    _layer_kernel[(programs,)](*args, **constants, STAGE=stage, RUN=255, PDL=False)
        else:
            launch = dict(STAGE=-1, RUN=RUN, PDL=pdl, num_warps=WARPS, num_stages=1,
                          maxnreg=min(255, 65536 // (PROGRAMS_PER_SM * 32 * WARPS)) // 8 * 8,
                          **({"launch_pdl": True} if pdl else {}))
            if torch.cuda.is_current_stream_capturing():  # (compiled before, by the warm-up runs)
                _layer_kernel[(programs,)](*args, **constants, **launch)
            else:
                kernel = _layer_kernel.warmup(*args, **constants, **launch, grid=(programs,))
                _check_resident(kernel, device, programs)
                _layer_kernel[(programs,)](*args, **constants, **launch)
    head = model.get_output_embeddings()
    bias = getattr(model, "final_logits_bias", None)
    logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    head_programs = triton.cdiv(triton.cdiv(vocab, BLOCK_N) * triton.cdiv(d, BLOCK_K), 2)  # (two tiles each)
    _head_kernel[(head_programs,)](
        x, head.weight, bias[0] if bias is not None else x, dec.layer_norm.weight, dec.layer_norm.bias,
        dec.layer_norm.eps, logits, parts, count, stats, rows, vocab, d, blocks, int(bias is not None), D=d, HD=hd,
        SBP=triton.next_power_of_2(blocks), BLOCK_M=block_m, BLOCK_N=BLOCK_N, KP=BLOCK_K, MAXR=2,
        PRECISION=precision, PDL=pdl and not interpreted, num_warps=WARPS, num_stages=1,
        **({"launch_pdl": True} if pdl else {}))
    return logits


def _head_group(heads: int, hd: int) -> int:
    """Heads of a row per attention item: the most (a power of 2 dividing `heads`, at most HEADS) whose block of
    keys holds at most 8192 values."""
    return next(g for g in (8, 4, 2, 1) if g <= HEADS and heads % g == 0
                and g * BLOCK_L * triton.next_power_of_2(hd) <= 8192 or g == 1)


__all__ = ["MAX_ROWS", "fits", "persistent_logits"]
