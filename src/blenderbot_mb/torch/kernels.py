"""Triton kernels for the decoder step on NVIDIA GPUs (`generate(kernels=True)`), and the step written with them.

A decode step of one row reads every weight once, so its time is the weights' bytes over the memory
bandwidth plus what each kernel costs to start and finish. The step written here launches 8 kernels per
decoder layer, each reading its weights once, and on Hopper GPUs each with programmatic dependent launch:
a kernel starts, and reads its first weights, while the one before it finishes. Steps of up to 32 rows (beam
search, small batches) of models up to d_model 1280 run the same step with `_rows_kernel` for the products:
tensor-core products in which each program holds all its weights in registers, read before it waits for the
kernel before it; a step of more than 16 rows as groups of 16 rows, each group's kernels on a CUDA stream of
its own, at once (`kernel_logits`). Larger batches and wider models run the fused step compiled by
torch.compile around the attention kernel (cuBLAS's products, inductor's fusions: docs/benchmarks.md). Either
way beam search reorders a table of cache rows that the attention kernel reads through, not the cache.

- `linear`: the layer norm of the row before it (statistics in float32, the normalized row rounded to the
  weight's dtype as the model's norm does), the product, the bias, the activation and the residual after it,
  in one kernel over blocks of output columns: a multiply-and-sum over [BLOCK_N, BLOCK_K] tiles of the
  weight, the next tile read while this one is summed. The first layer's q/k/v kernel also makes its row
  from the embedding tables (token embedding * scale + position embedding at the step index) and writes it
  for the residual: no lookup kernels before it. Several rows: the same in `_rows_kernel`, [rows, K] x [K, N]
  over programs of 32 or 64 outputs and up to 1280 of K (a longer K in parts whose sums the last part to
  finish adds, in order), multiplied in power-of-two pieces (1024 + 256), the norm's statistics from the rows
  the program holds. Both kernels read the norm's scale and shift with their first weights.
- `top_k`: beam search's top-k over beams x vocabulary (torch.topk's values and indices, ties in the lower
  index first) in two kernels: each part's k best, then the best of those.
- `attention`: one query per row and head over the cache: the self-attention also writes the new key and
  value into the cache at the step index (read from the device, so a CUDA graph replays it; or the caller
  does, in a compiled step) and attends to the positions before it plus the new one, each position read
  from the cache row a beam table names, where there is one; the cross-attention attends to the encoder
  positions its mask keeps. Online softmax in float32; masked keys weigh exactly zero. The first layer's
  self-attention also sets each row's beam-table entry at the step index.
- `reorder_rows`: beam search's reorder of the beam table, in place.
- `write_state`: the end of a captured search step (generation.CudaGraphLoop): every new value of the loop's
  state into its buffer, where the step held, in one kernel.

On the CPU the same kernels run in Triton's interpreter (`TRITON_INTERPRET=1` set before the first import of
Triton), which is how the tests check them against the model's own step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with PyTorch's CUDA builds for Linux
    triton = None
try:  # programmatic dependent launch (Hopper and later): Triton 3.4+
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover
    gdc_wait = None

PDL = True  # launch with programmatic dependent launch where the GPU and Triton have it (benchmarks turn it off)
ROWS = True  # several rows (beam search, batches) through _rows_kernel (benchmarks turn it off to compare)
FOLD_EMBEDDING = True  # the embedding lookup inside the first layer's q/k/v kernel (benchmarks turn it off)
GROUPS = True  # a step of more than GROUP_ROWS rows as groups of rows at once, on CUDA streams of their own
GROUP_ROWS = 16  # (benchmarks turn GROUPS off): the rows of one block of the several-row kernel


def _pdl(x) -> bool:
    if not PDL or gdc_wait is None or not x.is_cuda or torch.compiler.is_compiling():
        return False  # (torch.compile launches the kernels of a compiled step itself)
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def check(model) -> None:
    """Refuses what the kernels don't run: no Triton, a CPU outside Triton's interpreter, other activations
    or Linear layers that aren't plain (int8, LoRA)."""
    if triton is None:
        raise ConfigError("kernels=True needs Triton (installed with PyTorch's CUDA builds for Linux: "
                          "pip install triton)")
    if model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernels=True runs Triton kernels on NVIDIA GPUs; this model is on {model.device.type} "
                          "(TRITON_INTERPRET=1 runs them interpreted on the CPU, slowly: for tests)")
    layer = model.get_decoder().layers[0]
    if model.config.activation_function not in ACTIVATIONS:
        raise ConfigError(f"kernels=True covers the activations {', '.join(ACTIVATIONS)}; this model's is "
                          f"{model.config.activation_function!r}")
    if type(layer.fc1) is not torch.nn.Linear:
        raise ConfigError("kernels=True reads plain Linear weights; this model's layers are replaced (int8, LoRA): "
                          "generate without kernels=")


ACTIVATIONS = {"gelu": 1, "relu": 2}


@dataclass(frozen=True)
class LinearConfig:
    """How `linear` splits its work: BLOCK_N output columns per program, BLOCK_K of the input per iteration,
    Triton's warps and pipeline stages."""

    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


OVERRIDES: dict = {}  # {(out, in): LinearConfig}: benchmarks/kernel_step.py's sweep sets these


@dataclass(frozen=True)
class RowsConfig:
    """How `linear` splits the work of several rows: BLOCK_N outputs and BLOCK_M rows per program, at most
    `chunks` blocks of BLOCK_K of K a program (a longer K is split over programs and their sums added in
    order; a program's part is multiplied in the pieces of `rows_pieces`), Triton's warps."""

    block_n: int = 32
    block_k: int = 256
    chunks: int = 5
    block_m: int = 16
    warps: int = 8


ROWS_OVERRIDES: dict = {}  # {(out, in): RowsConfig}: benchmarks set these
ROWS_K = 1280  # the most of K a program of the several-row kernel holds (and so the widest norm it makes)
ROWS_M = 32  # the most rows a step runs through the several-row kernel (over 16: two groups of rows, GROUPS)


def rows_fit(model, rows: int) -> bool:
    """Whether a step of `rows` rows (2 or more) runs the several-row kernel: up to ROWS_M rows (a program
    multiplies a block of up to 16; more than 16 rows run as groups of 16 at once), of a model whose norms'
    rows (d_model) fit one program (ROWS_K). Otherwise (3B and 9B, batches of more rows) the fused step
    compiled around the attention kernel runs. At 32 rows generate() took 0.915x its time in one chain of
    kernels, 0.82x in two groups (0.904x one chain's), at 8 rows 0.81x (one H100, then one H200, 400M); at 48
    rows the groups took 1.007x, at 64 rows 1.25x the compiled step's time (one H200; docs/benchmarks.md)."""
    return ROWS and rows <= ROWS_M and model.config.d_model <= ROWS_K


def rows_pieces(part: int) -> tuple[int, ...]:
    """A program's `part` of K as the several-row kernel multiplies it: powers of two, largest first (1280 =
    1024 + 256). Each piece's rows go through shared memory on their way to the tensor cores, with a barrier
    before and after; the 400M step of 10 rows took 535 us in two pieces against 591 in five of 256 (one H100,
    docs/benchmarks.md)."""
    return tuple(1 << b for b in reversed(range(part.bit_length())) if part >> b & 1)


def rows_config(n: int, k: int, whole: bool = False, interpreted: bool = False) -> RowsConfig:
    """The launch settings of the several-row product [rows, k] x [k, n]: each program holds its weights for
    up to 1280 of K in registers (160 a thread, whatever the outputs a program: each warp multiplies 8 of
    them), read before it waits for the kernel before it; 8 warps. 32 outputs a program where that makes at
    most 64 programs, else 64 outputs: a kernel of fewer programs than half the SMs leaves the others to the
    next kernel, which starts there and reads its weights while this one runs (one such program fills an
    SM's registers). Longer K is split over programs, unless `whole` (a norm's rows). Measured on an H200,
    the 400M step of 10 rows replayed (docs/benchmarks.md): 578 us against 735 with 32 outputs everywhere
    and 867 for the compiled step. `interpreted` (Triton's interpreter on the CPU, for tests): all outputs in
    one program (each program's operations are Python there)."""
    if (n, k) in ROWS_OVERRIDES:
        return ROWS_OVERRIDES[n, k]
    block_k = min(256, max(16, triton.next_power_of_2(k)))
    chunks = max(1, ROWS_K // block_k)
    if interpreted:
        return RowsConfig(block_n=min(max(16, triton.next_power_of_2(n)), 1024), block_k=block_k, chunks=chunks)
    parts = 1 if whole else triton.cdiv(triton.cdiv(k, block_k), chunks)
    return RowsConfig(block_n=32 if triton.cdiv(n, 32) * parts <= 64 else 64, block_k=block_k, chunks=chunks)



def linear_config(n: int, k: int, gpu: str = "", interpreted: bool = False) -> LinearConfig:
    """The launch settings for a [k] x [k, n] product per row on the GPU named `gpu` (torch.cuda's device
    name): a few outputs per program over the whole row, enough programs to keep the memory busy. The best of
    sweeps at the 400M shapes (benchmarks/kernel_step.py --sweep, then the whole step timed with them:
    docs/benchmarks.md): on an H100 for H100s at rows of up to 1280 (wider blocks: the 400M step took 429 us
    against 462 with the others; at the 3B shapes the others were faster, 2171 against 2266 us), else on an
    H200. `interpreted` (Triton's interpreter on the CPU, for tests): as few programs as blocks of at most
    2**20 values allow (each program's operations are Python there)."""
    if (n, k) in OVERRIDES:
        return OVERRIDES[n, k]
    if interpreted:
        block_k = min(triton.next_power_of_2(k), 4096)
        return LinearConfig(block_n=min(triton.next_power_of_2(n), 2**20 // block_k), block_k=block_k)
    if k >= 4 * n:  # fc2's long rows
        return LinearConfig(block_n=4, block_k=1024, warps=8, stages=3)
    if "H100" in gpu and k <= 1280:
        if n <= k:
            return LinearConfig(block_n=16, block_k=1024, warps=8, stages=3)
        if n <= 3 * k:  # q/k/v
            return LinearConfig(block_n=16, block_k=512, warps=8, stages=3)
        return LinearConfig(block_n=8, block_k=512 if n <= 4 * k else 256, warps=4, stages=3)
    if n <= k:
        return LinearConfig(block_n=4, block_k=512, warps=4, stages=3)
    return LinearConfig(block_n=8 if n <= 4 * k else 16, block_k=256, warps=4, stages=1)


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


if triton is not None:

    @triton.jit
    def _embedded(e_row, p_row, offsets, keep, scale):
        """The decoder's input row at `offsets`: token embedding * scale + position embedding, each step
        rounded to the tables' dtype as the model's own operations round them."""
        e = tl.load(e_row + offsets, mask=keep, other=0.0)
        p = tl.load(p_row + offsets, mask=keep, other=0.0)
        return ((e.to(tl.float32) * scale).to(e.dtype).to(tl.float32) + p.to(tl.float32)).to(e.dtype)

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, y_ptr, N, K, eps,
                       stride_xm, stride_wn, stride_rm, stride_ym,
                       tok_ptr, emb_ptr, pos_ptr, idx_ptr, scale, stride_em, stride_pm,
                       NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, BIAS: tl.constexpr,
                       EMBED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW: tl.constexpr,
                       PDL: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's output columns
        x_ptr += tl.program_id(1) * stride_xm  # and its row (EMBED: where the embedded row is written)
        keep_n = rn < N
        if PDL:  # the next kernel may start (and read its weights) while this one runs
            tl.extra.cuda.gdc_launch_dependents()
        rk = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=keep_n[:, None] & (rk < K)[None, :],
                    other=0.0)  # the first block of weights: nothing before this kernel writes them
        if NORM:  # and of the norm's scale and shift
            g = tl.load(g_ptr + rk, mask=rk < K, other=0.0)
            beta = tl.load(beta_ptr + rk, mask=rk < K, other=0.0)
        if PDL:  # the row and the residual (EMBED: the token and the step index): written by the kernels before
            tl.extra.cuda.gdc_wait()
        if EMBED:  # the row from the embedding tables: token ids [rows], the step index [1] on the device
            e_row = emb_ptr + tl.load(tok_ptr + tl.program_id(1)).to(tl.int64) * stride_em
            p_row = pos_ptr + tl.load(idx_ptr).to(tl.int64) * stride_pm
        if NORM:  # the row's statistics in float32, from the whole row at once (K <= ROW)
            rr = tl.arange(0, ROW)
            if EMBED:
                xe = _embedded(e_row, p_row, rr, rr < K, scale)
                if tl.program_id(0) == 0:  # the embedded row, for the residual after the attention
                    tl.store(x_ptr + rr, xe, mask=rr < K)
                xr = xe.to(tl.float32)
            else:
                xr = tl.load(x_ptr + rr, mask=rr < K, other=0.0).to(tl.float32)
            mean = tl.sum(xr, axis=0) / K
            xr = tl.where(rr < K, xr - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xr * xr, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            keep_k = rk < K
            w_next = tl.load(w_ptr + rn[:, None] * stride_wn + (rk + BLOCK_K)[None, :],
                             mask=keep_n[:, None] & (rk + BLOCK_K < K)[None, :], other=0.0)  # read ahead
            if NORM:
                g_next = tl.load(g_ptr + rk + BLOCK_K, mask=rk + BLOCK_K < K, other=0.0)
                beta_next = tl.load(beta_ptr + rk + BLOCK_K, mask=rk + BLOCK_K < K, other=0.0)
            if EMBED:
                x = _embedded(e_row, p_row, rk, keep_k, scale)
            else:
                x = tl.load(x_ptr + rk, mask=keep_k, other=0.0)
            if NORM:
                x = (x.to(tl.float32) - mean) * rstd * g.to(tl.float32) + beta.to(tl.float32)
                g, beta = g_next, beta_next
            x = x.to(w_ptr.dtype.element_ty)  # [BLOCK_K], rounded as the norm's output would be
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w = w_next
        y = tl.sum(acc, axis=1)  # [BLOCK_N]
        if BIAS:
            y += tl.load(b_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)
        if ACT == 1:
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif ACT == 2:
            y = tl.maximum(y, 0.0)
        if RESIDUAL:
            y += tl.load(r_ptr + tl.program_id(1) * stride_rm + rn, mask=keep_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + tl.program_id(1) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=keep_n)

    @triton.jit
    def _rows_chunk(x_ptr, rm, keep_m, rk, keep_k, stride_xm, tok_ptr, emb_ptr, pos_ptr, idx_ptr, scale, stride_em,
                    stride_pm, EMBED: tl.constexpr):
        """The input rows `rm` at columns `rk` [BLOCK_M, BLOCK_K]: loaded, or (EMBED) made from the embedding
        tables as _embedded makes one row."""
        both = keep_m[:, None] & keep_k[None, :]
        if EMBED:
            e_rows = emb_ptr + tl.load(tok_ptr + rm, mask=keep_m, other=0).to(tl.int64) * stride_em
            p_row = pos_ptr + tl.load(idx_ptr).to(tl.int64) * stride_pm  # the same position for every row
            e = tl.load(e_rows[:, None] + rk[None, :], mask=both, other=0.0)
            p = tl.load(p_row + rk, mask=keep_k, other=0.0)
            return ((e.to(tl.float32) * scale).to(e.dtype).to(tl.float32) + p.to(tl.float32)[None, :]).to(e.dtype)
        return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=both, other=0.0)

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, y_ptr, part_ptr, count_ptr, M, N, eps,
                     stride_xm, stride_wn, stride_rm, stride_ym,
                     tok_ptr, emb_ptr, pos_ptr, idx_ptr, scale, stride_em, stride_pm,
                     K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
                     BIAS: tl.constexpr, EMBED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PIECES: tl.constexpr, STARTS: tl.constexpr, PART: tl.constexpr, SPLIT: tl.constexpr,
                     IEEE: tl.constexpr, PDL: tl.constexpr):
        """`linear` for several rows. Each program computes BLOCK_N outputs of BLOCK_M rows over PART of K (all
        of K, or with SPLIT > 1 its part: the parts' sums are then added in order by the part that finishes
        last) as tensor-core products, one a piece of K: PIECES are powers of two (sizes) adding up to PART,
        at STARTS within it (1280 = 1024 + 256: each piece's rows pass through shared memory once, with two
        barriers, on their way to the tensor cores). It reads all its weights, the kernel's only large reads,
        and the norm's scale and shift, before it waits for the kernels before it (programmatic dependent
        launch), which write its rows: they stream in while those run. The rows are then read once: for the
        norm's statistics (two passes over them in registers) and for the products."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        keep_n, keep_m = rn < N, rm < M
        start = tl.program_id(2) * PART
        ws = ()
        gs = ()
        bs = ()
        for c in tl.static_range(len(PIECES)):
            at = start + STARTS[c] + tl.arange(0, PIECES[c])
            ws = ws + (tl.load(w_ptr + rn[:, None] * stride_wn + at[None, :],
                               mask=keep_n[:, None] & (at < K)[None, :], other=0.0),)
            if NORM:
                gs = gs + (tl.load(g_ptr + at, mask=at < K, other=0.0),)
                bs = bs + (tl.load(beta_ptr + at, mask=at < K, other=0.0),)
        if PDL:
            tl.extra.cuda.gdc_wait()
        xs = ()
        for c in tl.static_range(len(PIECES)):
            at = start + STARTS[c] + tl.arange(0, PIECES[c])
            xs = xs + (_rows_chunk(x_ptr, rm, keep_m, at, at < K, stride_xm, tok_ptr, emb_ptr, pos_ptr, idx_ptr,
                                   scale, stride_em, stride_pm, EMBED),)
        if NORM:  # (SPLIT == 1: the program holds its rows whole) the statistics in float32
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in tl.static_range(len(PIECES)):
                total += tl.sum(xs[c].to(tl.float32), axis=1)
            mean = total / K
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in tl.static_range(len(PIECES)):
                at = start + STARTS[c] + tl.arange(0, PIECES[c])
                centred = tl.where((at < K)[None, :], xs[c].to(tl.float32) - mean[:, None], 0.0)
                squares += tl.sum(centred * centred, axis=1)
                if EMBED and pid_n == 0:  # the embedded rows, for the residual after the attention
                    tl.store(x_ptr + rm[:, None] * stride_xm + at[None, :], xs[c],
                             mask=keep_m[:, None] & (at < K)[None, :])
            rstd = 1.0 / tl.sqrt(squares / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(len(PIECES)):
            at = start + STARTS[c] + tl.arange(0, PIECES[c])
            x = xs[c]
            if NORM:
                x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gs[c].to(tl.float32)[None, :]
                     + bs[c].to(tl.float32)[None, :])
            x = tl.where(keep_m[:, None] & (at < K)[None, :], x.to(w_ptr.dtype.element_ty), 0.0)
            if IEEE:  # float32 weights: exact float32 products, not TF32
                acc = tl.dot(x, tl.trans(ws[c]), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(ws[c]), acc)
        keep = keep_m[:, None] & keep_n[None, :]
        if SPLIT > 1:  # each part's sums to memory; the last part of this block to finish adds them, in order
            parts = part_ptr + rm[:, None] * N + rn[None, :]
            tl.store(parts + tl.program_id(2) * M * N, acc, mask=keep)
            count = count_ptr + pid_n * tl.num_programs(1) + pid_m
            if tl.atomic_add(count, 1) == SPLIT - 1:  # (acq_rel: the other parts' stores are visible)
                acc = tl.load(parts, mask=keep, other=0.0)
                for i in tl.static_range(1, SPLIT):
                    acc += tl.load(parts + i * M * N, mask=keep, other=0.0)
                tl.atomic_xchg(count, 0)  # ready for the next call
                _rows_epilogue(acc, b_ptr, r_ptr, y_ptr, rn, rm, keep_n, keep, stride_rm, stride_ym, ACT,
                               RESIDUAL, BIAS)
        else:
            _rows_epilogue(acc, b_ptr, r_ptr, y_ptr, rn, rm, keep_n, keep, stride_rm, stride_ym, ACT, RESIDUAL,
                           BIAS)

    @triton.jit
    def _rows_epilogue(acc, b_ptr, r_ptr, y_ptr, rn, rm, keep_n, keep, stride_rm, stride_ym, ACT: tl.constexpr,
                       RESIDUAL: tl.constexpr, BIAS: tl.constexpr):
        y = acc  # [BLOCK_M, BLOCK_N], as _linear_kernel's epilogue
        if BIAS:
            y += tl.load(b_ptr + rn, mask=keep_n, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif ACT == 2:
            y = tl.maximum(y, 0.0)
        if RESIDUAL:
            y += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=keep, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _cache_block(k_ptr, v_ptr, head_k, head_v, row, table_row, positions, keep, rd, keep_d,
                     stride_kr, stride_kl, stride_vr, stride_vl, TABLE: tl.constexpr, ALIGN: tl.constexpr):
        """The keys and values [BLOCK_L, BLOCK_D] at `positions` (masked by `keep`): from cache row `row`, or
        (TABLE) each position from the cache row its table entry names. Every position's offset is a multiple
        of ALIGN elements (the caller checked), so the loads of a position's head_dim values are vectorized."""
        both = keep[:, None] & keep_d[None, :]
        src = tl.load(table_row + positions, mask=keep, other=0).to(tl.int64) if TABLE else row
        k_at = tl.multiple_of(head_k + src * stride_kr + positions * stride_kl, ALIGN)
        v_at = tl.multiple_of(head_v + src * stride_vr + positions * stride_vl, ALIGN)
        k = tl.load(k_ptr + k_at[:, None] + rd[None, :], mask=both, other=0.0)
        v = tl.load(v_ptr + v_at[:, None] + rd[None, :], mask=both, other=0.0)
        return k, v

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, new_ptr, index_ptr, mask_ptr, table_ptr, L, scale,
                          stride_qr, stride_kr, stride_kh, stride_kl, stride_vr, stride_vh, stride_vl,
                          stride_or, stride_nr, stride_mr, stride_tr, D, ROW0,
                          SELF: tl.constexpr, MASK: tl.constexpr, TABLE: tl.constexpr, WRITE: tl.constexpr,
                          SET_TABLE: tl.constexpr, HD: tl.constexpr, ALIGN: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        own = row + ROW0  # the row's own cache row (a group of a step's rows: the group's first row's + row)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rd = tl.arange(0, BLOCK_D)
        keep_d = rd < HD
        head_k = head.to(tl.int64) * stride_kh
        head_v = head.to(tl.int64) * stride_vh
        table_row = table_ptr + row * stride_tr
        # the first block of the cache's positions (self-attention: written by earlier steps; else the
        # encoder's), read at once: neither the step index nor the mask is waited for (a position past the index
        # or masked is read, then weighs exactly 0), nor the kernels before, which write q and the new key/value
        rl = tl.arange(0, BLOCK_L)
        k, v = _cache_block(k_ptr, v_ptr, head_k, head_v, own, table_row, rl, rl < L, rd, keep_d,
                            stride_kr, stride_kl, stride_vr, stride_vl, TABLE, ALIGN)
        n = tl.load(index_ptr).to(tl.int32) if SELF else L
        keep_l = rl < n
        if SET_TABLE:  # row's new position in its own cache row (no program reads the entry at the index:
            if head == 0:  # the first block's read of it is masked, and any row it names is in the cache)
                tl.store(table_row + n, own.to(table_ptr.dtype.element_ty))
        if MASK:
            keep_l = keep_l & (tl.load(mask_ptr + row * stride_mr + rl, mask=rl < L, other=0) != 0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_ptr + row * stride_qr + head * HD + rd, mask=keep_d, other=0.0).to(tl.float32)
        q = (q * scale).to(tl.float32)  # float32 whatever the scale's type
        best = tl.full([1], -1.0e30, tl.float32)  # the running maximum score
        total = tl.zeros([1], dtype=tl.float32)  # the running sum of exp(score - best)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if SELF:  # the new key and value, attended after the cache's positions
            new_k = tl.load(new_ptr + row * stride_nr + head * HD + rd, mask=keep_d, other=0.0)
            new_v = tl.load(new_ptr + row * stride_nr + D + head * HD + rd, mask=keep_d, other=0.0)
        for l0 in range(0, n, BLOCK_L):
            ahead = l0 + BLOCK_L + rl  # the next block, read ahead
            keep_next = ahead < n
            if MASK:
                keep_next = keep_next & (tl.load(mask_ptr + row * stride_mr + ahead, mask=keep_next, other=0) != 0)
            k_next, v_next = _cache_block(k_ptr, v_ptr, head_k, head_v, own, table_row, ahead, keep_next, rd, keep_d,
                                          stride_kr, stride_kl, stride_vr, stride_vl, TABLE, ALIGN)
            s = tl.where(keep_l, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))  # [BLOCK_L]
            top = tl.maximum(best, tl.max(s, axis=0))
            p = tl.exp(s - top)
            alpha = tl.exp(best - top)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(tl.where(keep_l[:, None], p[:, None] * v.to(tl.float32), 0.0), axis=0)
            best, k, v, keep_l = top, k_next, v_next, keep_next
        if SELF:
            s = tl.sum(new_k.to(tl.float32) * q, axis=0)
            top = tl.maximum(best, s)
            p = tl.exp(s - top)
            alpha = tl.exp(best - top)
            total = total * alpha + p
            acc = acc * alpha + p * new_v.to(tl.float32)
            if WRITE:  # (else the caller writes them: a compiled step would copy the cache around a kernel
                at = own.to(tl.int64) * stride_kr + head_k + n * stride_kl  # that writes into it)
                tl.store(k_ptr + at + rd, new_k, mask=keep_d)
                tl.store(v_ptr + own.to(tl.int64) * stride_vr + head_v + n * stride_vl + rd, new_v, mask=keep_d)
        tl.store(o_ptr + row * stride_or + head * HD + rd, (acc / total).to(o_ptr.dtype.element_ty), mask=keep_d)

    _LOWEST = tl.constexpr(-9223372036854775808)  # below every key: a taken or absent element

    @triton.jit
    def _keys(x, offsets, keep):
        """int64 keys ordered as (value, then the lower index first): the value's float32 bits made signed-
        ordered in the high half, 2**32 - 1 - index in the low half; one NaN ranks above +inf (as torch.topk's),
        -0.0 as 0.0."""
        x = x.to(tl.float32)
        x = tl.where(x != x, float("nan"), x + 0.0)
        bits = x.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        return tl.where(keep, ordered * 4294967296 + (4294967295 - offsets.to(tl.int64)), _LOWEST)

    @triton.jit
    def _take_best(keys, x_row, val_ptr, idx_ptr, K: tl.constexpr, KB: tl.constexpr, FINAL: tl.constexpr):
        """The K largest keys, largest first: their index and value (FINAL), else the keys themselves. Kept in
        registers and written after the last (one read of the values, not one a key waited on in turn). KB: K
        rounded up to a power of 2."""
        j = tl.arange(0, KB)
        taken = tl.full(j.shape, _LOWEST, tl.int64)
        for n in range(K):
            best = tl.max(keys, axis=0)
            keys = tl.where(keys == best, _LOWEST, keys)
            taken = tl.where(j == n, best, taken)
        if FINAL:
            at = 4294967295 - (taken & 4294967295)
            tl.store(idx_ptr + j, at, mask=j < K)
            tl.store(val_ptr + j, tl.load(x_row + at, mask=j < K), mask=j < K)
        else:
            tl.store(idx_ptr + j, taken, mask=j < K)

    @triton.jit
    def _write_state_kernel(go_ptr, sources, targets, sizes, BLOCK: tl.constexpr):
        """targets[i][:] = sources[i][:] for i = program_id(0), where go_ptr holds true."""
        i, block = tl.program_id(0), tl.program_id(1)
        if tl.load(go_ptr) != 0:
            r = block * BLOCK + tl.arange(0, BLOCK)
            for t in tl.static_range(len(sources)):
                if i == t:
                    keep = r < sizes[t]
                    tl.store(targets[t] + r, tl.load(sources[t] + r, mask=keep), mask=keep)

    @triton.jit
    def _reorder_rows_kernel(table_ptr, rows_ptr, M, L, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
        """table[i, j] = table[rows[i], j] for every row i and this program's block of columns j: all read
        before any is written (the rows of a column move among themselves only)."""
        r = tl.arange(0, BLOCK_M)
        j = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        keep = (r[:, None] < M) & (j[None, :] < L)
        source = tl.load(rows_ptr + r, mask=r < M, other=0)
        values = tl.load(table_ptr + source[:, None] * L + j[None, :], mask=keep)
        tl.debug_barrier()
        tl.store(table_ptr + r[:, None] * L + j[None, :], values, mask=keep)

    @triton.jit
    def _top_k_kernel(x_ptr, keys_ptr, val_ptr, idx_ptr, N, stride_xr, stride_vr, stride_ir,
                      K: tl.constexpr, KB: tl.constexpr, PART: tl.constexpr, FINAL: tl.constexpr):
        """Pass 1: each program's K best of its PART values of a row (FINAL: there is one part)."""
        row, part, parts = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        offsets = part * PART + tl.arange(0, PART)
        keep = offsets < N
        x_row = x_ptr + row.to(tl.int64) * stride_xr
        keys = _keys(tl.load(x_row + offsets, mask=keep, other=0.0), offsets, keep)
        if FINAL:
            _take_best(keys, x_row, val_ptr + row * stride_vr, idx_ptr + row * stride_ir, K, KB, True)
        else:
            _take_best(keys, x_row, val_ptr, keys_ptr + (row * parts + part) * K, K, KB, False)

    @triton.jit
    def _top_k_merge_kernel(keys_ptr, x_ptr, val_ptr, idx_ptr, M, stride_xr, stride_vr, stride_ir,
                            K: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 2: the K best of a row's parts' M = parts * K keys."""
        row = tl.program_id(0)
        r = tl.arange(0, BLOCK)
        keys = tl.load(keys_ptr + row * M + r, mask=r < M, other=_LOWEST)
        _take_best(keys, x_ptr + row.to(tl.int64) * stride_xr, val_ptr + row * stride_vr,
                   idx_ptr + row * stride_ir, K, KB, True)


TOP_K_PART = 1024  # values per program of top_k's first pass (swept on an H100: docs/benchmarks.md)
TOP_K_WARPS = 4


TOP_K_SHORTEST = 1024  # shorter rows keep torch.topk (one kernel there already)
TOP_K_CANDIDATES = 8192  # at most this many candidates a row for top_k's second pass (one program a row)


def top_k_fits(x, k: int) -> bool:
    """Whether generate(kernels=True) runs `top_k` for torch.topk(x, k): float rows [rows, N], contiguous, of
    at least TOP_K_SHORTEST values, k of 1 to 64, and at most TOP_K_CANDIDATES candidates (parts x k) a row
    (beam search's top 2 x beams of beams x vocabulary: 1,580 candidates at 10 beams of the 400M model)."""
    return (x.dim() == 2 and x.is_floating_point() and 0 < k <= min(64, x.shape[1]) and x.stride(1) == 1
            and TOP_K_SHORTEST <= x.shape[1] and triton.cdiv(x.shape[1], TOP_K_PART) * k <= TOP_K_CANDIDATES)


def top_k(x, k: int, part: int | None = None, warps: tuple[int, int] | None = None):
    """torch.topk(x, k) over the last axis of x [rows, N] (sorted, largest first), ties in the lower index
    first, in two kernels: the k best of each `part` values (each program picks its best k times over its
    part, as int64 keys of value then index), then the k best of those. torch.topk's radix selection runs
    ~13 kernels (~70 us a beam-search step at 10 beams of the 400M model on an H100: docs/benchmarks.md).
    -> (values [rows, k] in x's dtype, int64 indices [rows, k])."""
    rows, n = x.shape
    part = part or TOP_K_PART
    parts = triton.cdiv(n, part)
    first, second = warps or (TOP_K_WARPS, 8 if parts * k > 2048 else 4)  # (warps a program of each pass)
    if not (x.is_floating_point() and 0 < k <= min(64, n) and x.stride(1) == 1 and parts * k <= TOP_K_CANDIDATES):
        raise ValueError(f"top_k takes contiguous float rows, k of 1 to 64 (at most the row's length) and at most "
                         f"{TOP_K_CANDIDATES} candidates (parts of {part} x k); got {tuple(x.shape)} {x.dtype}, "
                         f"k={k}")
    values = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    index = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    if parts == 1:
        _top_k_kernel[(rows, 1)](x, index, values, index, n, x.stride(0), values.stride(0), index.stride(0),
                                 K=k, KB=triton.next_power_of_2(k), PART=triton.next_power_of_2(n), FINAL=True,
                                 num_warps=first)
        return values, index
    keys = torch.empty(rows, parts * k, dtype=torch.int64, device=x.device)
    _top_k_kernel[(rows, parts)](x, keys, values, index, n, x.stride(0), values.stride(0), index.stride(0),
                                 K=k, KB=triton.next_power_of_2(k), PART=part, FINAL=False, num_warps=first)
    _top_k_merge_kernel[(rows,)](keys, x, values, index, parts * k, x.stride(0), values.stride(0),
                                 index.stride(0), K=k, KB=triton.next_power_of_2(k),
                                 BLOCK=triton.next_power_of_2(parts * k), num_warps=second)
    return values, index


STATE_BLOCK = 1024  # values a program of write_state


def write_state(go, sources, targets) -> None:
    """`targets[i].copy_(sources[i])` for each pair where `go` (a device bool, one value) holds, else nothing,
    in one kernel: the end of a captured search step (generation.CudaGraphLoop), instead of a `where` and a
    copy per buffer. Pairs of the same shape and dtype, targets contiguous (sources made so)."""
    sources = [x.contiguous() for x in sources]
    for x, y in zip(sources, targets, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype or not y.is_contiguous():
            raise ValueError(f"write_state writes a source into a contiguous target of its shape and dtype; got "
                             f"{tuple(x.shape)} {x.dtype} into {tuple(y.shape)} {y.dtype}")
    sizes = tuple(x.numel() for x in sources)
    grid = (len(sources), triton.cdiv(max(sizes), STATE_BLOCK))
    _write_state_kernel[grid](go, tuple(sources), tuple(targets), sizes, BLOCK=STATE_BLOCK)


REORDER_BLOCK = 4096  # values a program of reorder_rows


def reorder_rows(table, rows) -> None:
    """Beam search's reorder of a beam table [M, L] in place: row i takes row `rows[i]`'s values (M indices,
    a permutation or not), in one kernel (index_select and a copy took 7 us a beam-search step on an H100)."""
    if table.dim() != 2 or not table.is_contiguous() or rows.shape != (table.shape[0],) or rows.is_floating_point():
        raise ValueError(f"reorder_rows takes a contiguous [M, L] table and M row indices; got "
                         f"{tuple(table.shape)} and {tuple(rows.shape)} {rows.dtype}")
    m, length = table.shape
    block_m = triton.next_power_of_2(m)
    block_l = min(triton.next_power_of_2(length), max(1, REORDER_BLOCK // block_m))
    _reorder_rows_kernel[(triton.cdiv(length, block_l),)](table, rows, m, length, BLOCK_M=block_m, BLOCK_L=block_l)


def linear(x, weight, bias=None, *, norm=None, activation=None, residual=None, out_dtype=None, config=None,
           embed=None, out=None, slot: int = 0):
    """`residual + activation(norm(x) @ weight.T + bias)` in one kernel: x [rows, K] (contiguous rows), weight
    [N, K], bias [N] or None, norm a LayerNorm module or None, activation "gelu" / "relu" / None, residual
    [rows, N] or None; the result [rows, N] in `out_dtype` (default x's). One row (or a LinearConfig): each
    program reads BLOCK_N rows of the weight for one row of x. Several rows (with ROWS on, or a RowsConfig):
    `_rows_kernel`, each weight read once for each block of up to 16 rows (`rows_config`).

    `embed` (with `norm`): an `Embedded`; the kernel makes x itself from the embedding tables and writes it
    into `x` (the decoder's first hidden state, for the residual after the first attention). `out`: the
    result's [rows, N] tensor (its rows may be strided), else a new one. `slot`: which counters a product with
    K split uses (one set per weight and slot): products on the same weights at once, on other streams, each
    with a slot of their own."""
    rows, k = x.shape
    n = weight.shape[0]
    if out is not None and (out.shape != (rows, n) or out.stride(1) != 1 or out.device != x.device
                            or out.dtype != (out_dtype or x.dtype)):
        raise ValueError(f"linear's out= takes a [{rows}, {n}] {out_dtype or x.dtype} tensor with contiguous rows "
                         f"on {x.device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    y = out if out is not None else torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    if embed is not None and (norm is None or not x.is_contiguous()):
        raise ValueError("embed= writes the embedded rows into a contiguous x, and needs norm=")
    x = x.contiguous()
    pdl = _pdl(x)
    e = embed if embed is None else dataclasses.replace(embed, tokens=embed.tokens.contiguous())  # read by row
    if isinstance(config, RowsConfig) or (config is None and rows > 1 and ROWS):
        whole = norm is not None  # the norm's statistics need whole rows: K is not split
        cfg = config or rows_config(n, k, whole=whole, interpreted=not x.is_cuda)
        blocks = triton.cdiv(k, cfg.block_k)
        split = 1 if whole else triton.cdiv(blocks, cfg.chunks)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m), split)
        part = cfg.block_k * triton.cdiv(blocks, split)  # the K of a program
        pieces = rows_pieces(part)
        counts = _counts(weight, grid[0] * grid[1], slot) if split > 1 else y
        parts = torch.empty(split, rows, n, dtype=torch.float32, device=x.device) if split > 1 else y
        _rows_kernel[grid](
            x, weight, bias if bias is not None else weight, residual if residual is not None else y,
            norm.weight if norm is not None else weight, norm.bias if norm is not None else weight, y, parts, counts,
            rows, n, norm.eps if norm is not None else 0.0,
            x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            *((e.tokens, e.table, e.positions, e.index, float(e.scale), e.table.stride(0), e.positions.stride(0))
              if e is not None else (x, x, x, x, 1.0, 0, 0)),
            K=k, NORM=norm is not None, ACT=ACTIVATIONS.get(activation, 0), RESIDUAL=residual is not None,
            BIAS=bias is not None, EMBED=e is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            PIECES=pieces, STARTS=tuple(sum(pieces[:i]) for i in range(len(pieces))), PART=part, SPLIT=split,
            IEEE=weight.dtype == torch.float32, PDL=pdl, num_warps=cfg.warps, num_stages=1,
            **({"launch_pdl": True} if pdl else {}))
        return y
    cfg = config or linear_config(n, k, _gpu_name(x.device), interpreted=not x.is_cuda)
    _linear_kernel[(triton.cdiv(n, cfg.block_n), rows)](
        x, weight, bias if bias is not None else weight, residual if residual is not None else y,
        norm.weight if norm is not None else weight, norm.bias if norm is not None else weight, y,
        n, k, norm.eps if norm is not None else 0.0,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        *((e.tokens, e.table, e.positions, e.index, float(e.scale), e.table.stride(0), e.positions.stride(0))
          if e is not None else (x, x, x, x, 1.0, 0, 0)),
        NORM=norm is not None, ACT=ACTIVATIONS.get(activation, 0), RESIDUAL=residual is not None,
        BIAS=bias is not None, EMBED=e is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ROW=triton.next_power_of_2(k) if norm is not None else 1, PDL=pdl, num_warps=cfg.warps,
        num_stages=cfg.stages, **({"launch_pdl": True} if pdl else {}))
    return y


_COUNTS: dict = {}
_RETIRED: list = []  # counters outgrown: graphs captured earlier may still count in them, so they stay allocated


def _counts(weight, size: int, slot: int = 0):
    """Zeroed int32 counters (at least `size`) for the several-row kernel's parts of K, one per block of outputs
    and rows, each set back to 0 by the program that used it. One set per weight (its device and address) and
    slot, so products of other models (or other layers, or other groups of a step's rows: their own slot)
    running at once on other streams never share them. Made on a
    product's first call, which generate() makes before it captures a CUDA graph (capture allows no new
    zeroed memory outside the graph). A call that needs more counters (other launch settings: benchmarks)
    gets a larger set, and the old one is kept: a graph captured with it counts there whenever it replays,
    and freed memory would be another tensor's by then."""
    key = weight.device, weight.data_ptr(), slot
    have = _COUNTS.get(key)
    if have is None or have.numel() < size:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kernels.linear: a several-row product's first call was inside a CUDA graph's "
                               "capture; run it once before capturing")
        if have is not None:
            _RETIRED.append(have)
        have = _COUNTS[key] = torch.zeros(size, dtype=torch.int32, device=weight.device)
    return have


@dataclass(frozen=True)
class Embedded:
    """The decoder's input rows as `linear(embed=...)` makes them: table[tokens] * scale + positions[index],
    tokens [rows] and index [1] on the device."""

    tokens: torch.Tensor
    table: torch.Tensor
    scale: float
    positions: torch.Tensor
    index: torch.Tensor


def attention_config(rows: int, length: int, head_dim: int) -> tuple[int, int]:
    """(keys per iteration, warps per program) for `rows` rows over `length` keys of `head_dim` values: up to
    64 keys (at most 4096 values a block for up to 15 rows, 2048 from 16), with 4 warps for one row, 2 for up
    to 15 rows, one from 16: more programs at once on each SM. Swept on an H100 (benchmarks/kernel_step.py
    --parts attention, cache 128 at index 64; self-attention, with a beam table, cross-attention):
    - 400M (head size 40): one row 2.2 / 2.3 / 2.2 us, 10 rows 3.3 / 3.6 / 2.7, 32 rows 4.4 / 5.6 / 3.9,
      against 7.3-24.4 us and 3.6-14.3 for cuDNN's attention;
    - 3B (80, in blocks of 128): one row 3.1 / 3.6 / 3.2, 10 rows 5.1 / 6.5 / 5.7, 32 rows 6.8 / 9.0 / 7.0.
      64 keys at 10 rows took 13.1 / 16.7 / 15.4: the block's size, not its keys, is what to bound."""
    block_d = triton.next_power_of_2(head_dim)
    keys = triton.next_power_of_2(length)
    if rows >= 16:
        return min(32, keys, max(16, 2048 // block_d)), 1
    if rows > 1:
        return min(64, keys, max(16, 4096 // block_d)), 2
    return min(64, keys), 4


def attention(q, k, v, *, heads: int, index=None, new=None, mask=None, table=None, write: bool = True,
              set_table: bool = False, block_l: int | None = None, warps: int | None = None, row0: int = 0):
    """One query per row and head: q [rows, >= heads * hd] (the first heads * hd columns; the rows may be
    strided, e.g. the fused qkv product's), k/v [rows, heads, L, hd] -> [rows, heads * hd].

    Self-attention: `index` (a device tensor [1]) and `new` ([rows, >= 2 * d]: the new keys then values, as
    the qkv product's columns d..3d): the new key and value are attended with the positions before it, and
    (`write`) written into k/v at the index; `write=False`: the caller writes them (a compiled step: a kernel
    writing into its inputs makes torch.compile copy them). `table` [rows, L] (beam search): position p < index
    of row r is read from cache row table[r, p] (the caller sets table[r, index] = r, each row's new position
    in its own cache row; `set_table`: this kernel sets it), so following the beams reorders the table, not the
    cache. Cross-attention: `mask` [rows, L] (nonzero: attended) or None (all). `block_l` keys per iteration and
    `warps` per program: attention_config()'s. `row0` (a group of a step's rows): q's rows (and new's, mask's,
    table's) are k/v's rows row0, row0 + 1, ... (their own cache rows; the table's entries name any of k/v's)."""
    rows, length, hd = q.shape[0], k.shape[2], k.shape[3]
    if row0 < 0 or row0 + rows > k.shape[0] or v.shape[0] != k.shape[0]:
        raise ValueError(f"attention: rows {row0}..{row0 + rows - 1} of k/v's {k.shape[0]} (v: {v.shape[0]})")
    d = heads * hd
    out = torch.empty(rows, d, dtype=k.dtype, device=k.device)
    self_attention = index is not None
    block, default_warps = attention_config(rows, length, hd)
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("attention() reads each position's head_dim values contiguous (stride 1)")
    _attention_kernel[(rows, heads)](
        q, k, v, out, new if self_attention else q, index if self_attention else q,
        mask if mask is not None else q, table if table is not None else q, length, hd ** -0.5,
        q.stride(0), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), new.stride(0) if self_attention else 0, mask.stride(0) if mask is not None else 0,
        table.stride(0) if table is not None else 0, d, row0,
        SELF=self_attention, MASK=mask is not None, TABLE=table is not None, WRITE=self_attention and write,
        SET_TABLE=self_attention and table is not None and set_table,
        HD=hd, ALIGN=_alignment(k, v), BLOCK_L=block_l or block,
        BLOCK_D=triton.next_power_of_2(hd), PDL=_pdl(k), num_warps=warps or default_warps,
        **({"launch_pdl": True} if _pdl(k) else {}))
    return out


def _alignment(k, v) -> int:
    """The largest of 8, 4, 2, 1 elements dividing every row/head/position offset into k and v: each
    position's values may then be read in vectors of up to 16 bytes (Triton knows the tensors' own addresses'
    alignment: it compiles for it)."""
    strides = [x.stride(i) for x in (k, v) for i in range(3)]
    return next(a for a in (8, 4, 2, 1) if all(s % a == 0 for s in strides))


def kernel_logits(model, tokens, cache, encoder_mask, weights):
    """The fused step (decoding.fused_logits) written with the kernels above; float32 logits [rows, vocab].
    cache: a KVCache with per-layer buffers [2, rows, heads, max_length, head_dim] and a device index [1];
    weights: decoding.fused_weights()'.

    A step of more than GROUP_ROWS rows (GROUPS) runs as groups of GROUP_ROWS rows, each its own chain of
    kernels, the first on the current stream and each other on a CUDA stream of its own, forked from it and
    joined back (inside a CUDA graph's capture too): while one group's kernel waits for the one before it, the
    other's runs. The same kernels on the same rows, so the same logits; 32 rows took 684 us a step against 775
    as one group (400M, one H200, benchmarks/stream_rows.py). Each group reads and writes its own rows of the
    cache, and through the beam table any row's earlier positions."""
    rows = tokens.shape[0]
    vocab = model.get_output_embeddings().weight.shape[0]
    if not GROUPS or rows <= GROUP_ROWS:
        return _group_logits(model, tokens, cache, encoder_mask, weights, 0, rows)
    logits = torch.empty(rows, vocab, dtype=torch.float32, device=tokens.device)
    starts = range(0, rows, GROUP_ROWS)
    here = torch.cuda.current_stream(tokens.device) if tokens.is_cuda else None  # (the interpreter: in turn)
    side = [_stream(tokens.device, group) for group in range(1, len(starts))] if here is not None else []
    for stream in side:  # forked before the first group's kernels are launched, which they would wait for
        stream.wait_stream(here)
    for group, start in enumerate(starts):
        stream = side[group - 1] if side and group else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            end = min(start + GROUP_ROWS, rows)
            _group_logits(model, tokens, cache, encoder_mask, weights, start, end, slot=group,
                          logits=logits[start:end])
    for stream in side:
        here.wait_stream(stream)
    return logits


_STREAMS: dict = {}


def _stream(device, group: int):
    """The CUDA stream of a step's group of rows `group` (1, 2, ...) on `device`: the same one every step."""
    key = device, group
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def _group_logits(model, tokens, cache, encoder_mask, weights, start: int, end: int, slot: int = 0, logits=None):
    """kernel_logits' step for rows start..end - 1 (all of them: 0, rows): the products' counters in `slot`,
    the logits into `logits` (else a new tensor)."""
    dec = model.get_decoder()
    index = cache.index
    heads = cache.buffers[0].shape[2]
    d = heads * cache.buffers[0].shape[4]
    act = model.config.activation_function
    layers, _ = weights
    tokens = tokens[start:end]
    table = cache.table if cache.table is None else cache.table[start:end]
    mask = encoder_mask if encoder_mask is None else encoder_mask[start:end]
    if FOLD_EMBEDDING:  # the embedding lookup inside the first product's kernel, which writes h
        h = torch.empty(tokens.shape[0], d, dtype=dec.embed_tokens.weight.dtype, device=tokens.device)
        embedded = Embedded(tokens, dec.embed_tokens.weight, dec.embed_scale, dec.embed_positions.weight, index)
    else:
        h, embedded = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(index), None  # [rows, d]
    for i, layer in enumerate(dec.layers):
        w = layers[i]
        kv = cache.buffers[i]  # (every row: the beam table may name any)
        qkv = linear(h, *w["qkv"], norm=layer.self_attn_layer_norm, embed=embedded if i == 0 else None,
                     slot=slot)  # [rows, 3d]
        out = attention(qkv, kv[0], kv[1], heads=heads, index=index, new=qkv[:, d:], table=table,
                        set_table=i == 0, row0=start)  # beam search: each row's new position in its own cache row
        h = linear(out, *w["out"], residual=h, slot=slot)
        if cache.cross_kv[i] is not None:
            q = linear(h, *w["cross_q"], norm=layer.encoder_attn_layer_norm, slot=slot)
            k, v = cache.cross_kv[i]
            out = attention(q, k[start:end], v[start:end], heads=heads, mask=mask)
            h = linear(out, *w["cross_out"], residual=h, slot=slot)
        f = linear(h, *w["fc1"], norm=layer.final_layer_norm, activation=act, slot=slot)
        h = linear(f, *w["fc2"], residual=h, slot=slot)
    head = model.get_output_embeddings()
    bias = getattr(model, "final_logits_bias", None)
    return linear(h, head.weight, None if bias is None else bias[0], norm=dec.layer_norm, out_dtype=torch.float32,
                  out=logits, slot=slot)
