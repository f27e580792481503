"""What a chain of dependent products costs on a GPU, three ways, each weight read from memory:

    python benchmarks/grid_barrier.py --products 96 --shape 1280x1280 [--rows 10]

- cuBLAS: `F.linear` one after another, captured as one CUDA graph (what the compiled step launches);
- kernels: `kernels.linear` one after another with programmatic dependent launch on Hopper (the one-row
  step's kernels; several rows read each weight once per row), captured as one CUDA graph;
- persistent: one kernel for the whole chain. Its programs stay resident; each holds a [BLOCK_N, BLOCK_K]
  tile of every product's weight. Before each product it reads its next tile from memory, then waits at a
  grid-wide barrier (a counter in global memory that every program increments once its part of the product
  before is written) and only then reads the rows it multiplies (one row on the CUDA cores, several as
  tensor-core tiles). Partial sums over K are added into the output with float32 atomics (the order varies:
  this is a measurement, not a kernel for decoding).

- persistent, sums in order: the same chain with each product's output written as the next one's bf16 rows in
  a fixed order, as a decoding step needs (run-to-run equal tokens): each part of K writes its float32 sums,
  and the part that finishes a block of outputs last (an atomic count) adds the block's parts in order and
  writes the rows. A layer's epilogues (bias, activation, residual) need such a place where a block's whole
  sum is known.

- persistent, whole K: the same chain, each program computing BLOCK_N outputs over the whole of K (no parts to
  add: the sums' order is fixed), its first block of K read before the barrier and the next blocks read ahead
  while one is multiplied.

- a kernel a product, its whole weight tile first (`--tiles`): each product a kernel of its own under
  programmatic dependent launch, each program reading all of its [BLOCK_N, K] weight tile into registers
  before it waits for the kernel before it, then the rows; sums over K in one program (the several-row
  product kernel of the decoding step, `kernels._rows_kernel`, is built this way). `--prefetched`: the tile
  asked of the L2 instead (a bulk prefetch per weight row), then multiplied in a pipelined loop.

Also the barrier alone (the same kernel with no product) per crossing. A decoder step of the 400M model is
a chain of ~73 products and ~24 attention calls; each kernel boundary in it costs ~4.5 us beyond the bytes
it reads (docs/benchmarks.md), which is what a persistent step would replace by a barrier.

The persistent kernel needs every program resident at once (it spins until the others arrive): settings of
more than two programs an SM are skipped.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from blenderbot_mb.torch import kernels


@triton.jit
def _chain_kernel(x_ptr, w_ptr, out_ptr, counter_ptr, M, N, K, PRODUCTS, stride_wp,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORK: tl.constexpr):
    """PRODUCTS products Y_{p+1} = Y_p W_p^T (Y_0 = x: M rows), each [M, K] x [N, K] with N == K, over a grid
    of (N / BLOCK_N) x (K / BLOCK_K) programs; out_ptr holds PRODUCTS + 1 float32 [M, N] blocks, zeroed but the
    first. One row: a multiply-and-sum on the CUDA cores; several (BLOCK_M >= 16): tensor-core tiles."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    programs = tl.num_programs(0) * tl.num_programs(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    keep_n, keep_k, keep_m = rn < N, rk < K, rm < M
    for p in range(PRODUCTS):
        if WORK:  # this product's weight tile: read before the barrier (it depends on nothing)
            w = tl.load(w_ptr + p * stride_wp + rn[:, None] * K + rk[None, :],
                        mask=keep_n[:, None] & keep_k[None, :], other=0.0)
        if p > 0:  # every program has added its part of product p - 1
            while tl.atomic_add(counter_ptr, 0, sem="acquire") < p * programs:
                pass
        if WORK:
            rows = out_ptr + p * M * K
            if BLOCK_M == 1:
                x = tl.load(rows + rk, mask=keep_k, other=0.0, cache_modifier=".cg")
                y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                tl.atomic_add(out_ptr + (p + 1) * M * N + rn, y, mask=keep_n, sem="relaxed")
            else:
                x = tl.load(rows + rm[:, None] * K + rk[None, :], mask=keep_m[:, None] & keep_k[None, :], other=0.0,
                            cache_modifier=".cg")
                y = tl.dot(x.to(w.dtype), tl.trans(w))  # [BLOCK_M, BLOCK_N], float32
                tl.atomic_add(out_ptr + (p + 1) * M * N + rm[:, None] * N + rn[None, :], y,
                              mask=keep_m[:, None] & keep_n[None, :], sem="relaxed")
        tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _arrive_and_wait(counter_ptr, target):
    """A grid-wide barrier: this program's stores done, it counts itself in and waits for `target` arrivals."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _ordered_chain_kernel(w_ptr, rows_ptr, part_ptr, count_ptr, counter_ptr, M, N, K, PRODUCTS, stride_wp,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The chain of _chain_kernel, each product's rows written to rows_ptr's other half in a fixed order: one
    program per [BLOCK_N, BLOCK_K] tile, its part's sums into part_ptr [K / BLOCK_K, M, N], and the last part of
    each block of outputs (count_ptr) adds the parts in order and writes the bf16 rows."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    parts = tl.num_programs(1)
    programs = tl.num_programs(0) * parts
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    keep_n, keep_k, keep_m = rn < N, rk < K, rm < M
    sums = rm[:, None] * N + rn[None, :]
    both = keep_m[:, None] & keep_n[None, :]
    for p in range(PRODUCTS):
        w = tl.load(w_ptr + p * stride_wp + rn[:, None] * K + rk[None, :], mask=keep_n[:, None] & keep_k[None, :],
                    other=0.0)  # before the barrier
        if p > 0:
            _arrive_and_wait(counter_ptr, p * programs)
        x = tl.load(rows_ptr + (p % 2) * M * K + rm[:, None] * K + rk[None, :], mask=keep_m[:, None] & keep_k[None, :],
                    other=0.0, cache_modifier=".cg")
        y = tl.dot(x, tl.trans(w))
        tl.store(part_ptr + pid_k * M * N + sums, y, mask=both)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == parts - 1:  # the block's last part: add them all
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for q in range(parts):
                total += tl.load(part_ptr + q * M * N + sums, mask=both, other=0.0, cache_modifier=".cg")
            tl.store(rows_ptr + ((p + 1) % 2) * M * N + sums, total.to(rows_ptr.dtype.element_ty), mask=both)
            tl.atomic_xchg(count_ptr + pid_n, 0)


def ordered_chain(x, weights, rows, parts, counts, counter, block_n: int, block_k: int, warps: int = 4):
    products, n, k = weights.shape
    m = x.shape[0]
    counter.zero_()
    rows[0].copy_(x)
    _ordered_chain_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weights, rows, parts, counts, counter, m, n, k, products, weights.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1)


@triton.jit
def _whole_k_chain_kernel(w_ptr, rows_ptr, counter_ptr, M, N, K, PRODUCTS, stride_wp,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr):
    """The chain of _chain_kernel, one program per BLOCK_N outputs over the whole of K (the rows in rows_ptr's
    halves in turn): the first BLOCK_K of its weights read before the barrier, then AHEAD (1 or 2) blocks of K
    read ahead of the one multiplied."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    keep_n, keep_m = rn < N, rm < M
    rk = tl.arange(0, BLOCK_K)
    for p in range(PRODUCTS):
        wp = w_ptr + p * stride_wp + rn[:, None] * K
        w = tl.load(wp + rk[None, :], mask=keep_n[:, None] & (rk < K)[None, :], other=0.0)  # before the barrier
        if AHEAD == 2:
            w2 = tl.load(wp + (rk + BLOCK_K)[None, :], mask=keep_n[:, None] & (rk + BLOCK_K < K)[None, :], other=0.0)
        if p > 0:
            _arrive_and_wait(counter_ptr, p * programs)
        src = rows_ptr + (p % 2) * M * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ahead = k0 + AHEAD * BLOCK_K + rk
            w_next = tl.load(wp + ahead[None, :], mask=keep_n[:, None] & (ahead < K)[None, :], other=0.0)
            x = tl.load(src + rm[:, None] * K + (k0 + rk)[None, :], mask=keep_m[:, None] & (k0 + rk < K)[None, :],
                        other=0.0, cache_modifier=".cg")
            acc += tl.dot(x, tl.trans(w))
            if AHEAD == 2:
                w = w2
                w2 = w_next
            else:
                w = w_next
        tl.store(rows_ptr + ((p + 1) % 2) * M * N + rm[:, None] * N + rn[None, :], acc.to(rows_ptr.dtype.element_ty),
                 mask=keep_m[:, None] & keep_n[None, :])


@triton.jit
def _tile_first_kernel(x_ptr, w_ptr, y_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, FIRST: tl.constexpr, PDL: tl.constexpr):
    """One product y = x W^T of a chain, as its own kernel: BLOCK_N outputs a program over the whole of K
    (K // BLOCK_K blocks), tensor-core tiles of BLOCK_M rows. Under programmatic dependent launch the program
    reads its first FIRST blocks of the weight (all of them: its whole tile) before it waits for the kernel
    before it, which writes x; the weights depend on nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    keep_n, keep_m = rn < N, rm < M
    CHUNKS: tl.constexpr = K // BLOCK_K
    wp = w_ptr + rn[:, None] * K + rk[None, :]
    xp = x_ptr + rm[:, None] * K + rk[None, :]
    ws = ()
    for c in tl.static_range(CHUNKS):
        if c < FIRST:
            ws = ws + (tl.load(wp + c * BLOCK_K, mask=keep_n[:, None], other=0.0),)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        if c < FIRST:
            w = ws[c]
        else:
            w = tl.load(wp + c * BLOCK_K, mask=keep_n[:, None], other=0.0)
        acc = tl.dot(tl.load(xp + c * BLOCK_K, mask=keep_m[:, None], other=0.0), tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=keep_m[:, None] & keep_n[None, :])


def tile_first(x, w, y, block_n: int, block_k: int, first: int, warps: int):
    """One product of the chain by _tile_first_kernel (launched with programmatic dependent launch where the GPU
    has it)."""
    m, k = x.shape
    n = w.shape[0]
    pdl = kernels._pdl(x)
    _tile_first_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        FIRST=first, PDL=pdl, num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}))
    return y


@triton.jit
def _l2_prefetch(row_ptrs, nbytes):
    """Asks the L2 to fetch `nbytes` bytes at each of `row_ptrs` (sm_90's bulk prefetch): no registers held,
    nothing waited for."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetched_kernel(x_ptr, w_ptr, y_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One product of the chain as its own kernel: before it waits for the kernel before it, each program asks
    the L2 for its whole weight tile (one bulk prefetch per weight row), then multiplies in a software-
    pipelined loop over K that finds the weights in the L2."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    keep_n, keep_m = rn < N, rm < M
    if PDL:
        _l2_prefetch(w_ptr + tl.minimum(rn, N - 1) * K, tl.full([BLOCK_N], K * 2, tl.int32))
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=keep_n[:, None], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=keep_m[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=keep_m[:, None] & keep_n[None, :])


def prefetched(x, w, y, block_n: int, block_k: int, warps: int, stages: int):
    m, k = x.shape
    n = w.shape[0]
    pdl = kernels._pdl(x)
    _prefetched_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        PDL=pdl, num_warps=warps, num_stages=stages, **({"launch_pdl": True} if pdl else {}))
    return y


def whole_k_chain(x, weights, rows, counter, block_n: int, block_k: int, ahead: int, warps: int = 4):
    products, n, k = weights.shape
    m = x.shape[0]
    counter.zero_()
    rows[0].copy_(x)
    _whole_k_chain_kernel[(triton.cdiv(n, block_n),)](
        weights, rows, counter, m, n, k, products, weights.stride(0), BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n, BLOCK_K=block_k, AHEAD=ahead, num_warps=warps, num_stages=1)


def persistent_chain(x, weights, out, counter, block_n: int, block_k: int, work: bool = True, warps: int = 4):
    products, n, k = weights.shape
    m = x.shape[0]
    counter.zero_()
    out[1:].zero_()
    out[0].copy_(x)
    _chain_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        x, weights, out, counter, m, n, k, products, weights.stride(0),
        BLOCK_M=1 if m == 1 else max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        WORK=work, num_warps=warps, num_stages=1)  # (Triton's pipelining would read a product's rows before
    # its barrier: the loop over products must run as written)


def graph_time(fn, repeats: int = 20) -> float:
    """Microseconds per replay of fn captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=96)
    p.add_argument("--rows", type=int, default=1, help="rows multiplied by each product (beams, batch)")
    p.add_argument("--shape", default="1280x1280", help="NxK of every product (N == K: each feeds the next)")
    p.add_argument("--blocks", default="64x256,32x512,32x256,16x512,64x128", help="persistent BLOCK_NxBLOCK_K settings")
    p.add_argument("--whole-k", default="16x256x1,16x256x2,16x512x1",
                   help="whole-K persistent BLOCK_NxBLOCK_KxAHEAD settings")
    p.add_argument("--prefetched", default="16x128x4x3,32x128x4x3,16x256x4x3,32x256x8x3,16x128x2x4",
                   help="a kernel a product, the weight tile asked of the L2 before the wait: "
                        "BLOCK_NxBLOCK_KxWARPSxSTAGES")
    p.add_argument("--tiles", default="16x256x10x4,16x256x1x4,16x128x10x4,16x256x10x8,32x256x10x8",
                   help="a kernel a product with the weight tile read before the wait: BLOCK_NxBLOCK_KxFIRSTxWARPS "
                        "(FIRST blocks of K read before the wait; K / BLOCK_K or more: all of them)")
    args = p.parse_args(argv)
    n, k = (int(v) for v in args.shape.split("x"))
    if n != k:
        p.error("--shape N x K needs N == K (each product's output is the next one's input)")
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()} ({sms} SMs) torch {torch.__version__} triton {triton.__version__}; "
          f"{args.products} products of {args.rows} row(s) by [{n}x{k}] {dtype}, {args.products * n * k * 2 / 2**20:.0f} MB of weights")
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.randn(args.products, n, k, device="cuda", dtype=dtype, generator=g) * k ** -0.5
    bias = torch.zeros(n, device="cuda", dtype=dtype)
    x = torch.randn(args.rows, k, device="cuda", dtype=dtype, generator=g)

    def cublas():
        y = x
        for w in weights:
            y = F.linear(y, w, bias)
        return y

    def triton_kernels():  # (several rows: each row's programs read the weight again)
        y = x
        for w in weights:
            y = kernels.linear(y, w, bias)
        return y

    reference = x.float()
    for w in weights:  # float32 products of the bf16 weights, each result rounded to bf16 as the chains do
        reference = F.linear(reference, w.float()).to(dtype).float()
    rows = {}
    for name, fn in (("cuBLAS, one kernel a product", cublas), ("kernels.linear with PDL", triton_kernels)):
        us = graph_time(fn)
        err = (fn().float() - reference).abs().max().item()
        rows[name] = us
        print(f"{name:<42} {us:9.1f} us  {us / args.products:6.2f} us a product  max|d| {err:.2e}", flush=True)
    out = torch.empty(args.products + 1, args.rows, n, device="cuda", dtype=torch.float32)
    counter = torch.zeros(1, device="cuda", dtype=torch.int32)
    for setting in filter(None, args.blocks.split(",")):
        bn, bk = (int(v) for v in setting.split("x"))
        grid = triton.cdiv(n, bn) * triton.cdiv(k, bk)
        if grid > 2 * sms:  # two programs an SM at most: each spins until all have arrived
            print(f"persistent {bn}x{bk}: {grid} programs, more than 2 an SM ({sms} SMs): skipped")
            continue
        for work in (True, False):
            us = graph_time(lambda bn=bn, bk=bk, work=work: persistent_chain(x, weights, out, counter, bn, bk, work))
            label = f"persistent {bn}x{bk} ({grid} programs){'' if work else ', barriers alone'}"
            err = (out[-1].to(dtype).float() - reference).abs().max().item() if work else float("nan")
            arrived = counter.item()  # one increment per program and product, if the barrier is right
            print(f"{label:<42} {us:9.1f} us  {us / args.products:6.2f} us a product  max|d| {err:.2e}  "
                  f"counter {arrived} (expected {args.products * grid})", flush=True)
        rows = torch.empty(2, args.rows, n, device="cuda", dtype=dtype)
        parts = torch.empty(triton.cdiv(k, bk), args.rows, n, device="cuda", dtype=torch.float32)
        counts = torch.zeros(triton.cdiv(n, bn), device="cuda", dtype=torch.int32)
        us = graph_time(lambda bn=bn, bk=bk, rows=rows, parts=parts, counts=counts: ordered_chain(
            x, weights, rows, parts, counts, counter, bn, bk))
        err = (rows[args.products % 2].float() - reference).abs().max().item()
        label = f"persistent {bn}x{bk}, sums in order"
        print(f"{label:<42} {us:9.1f} us  {us / args.products:6.2f} us a product  max|d| {err:.2e}  "
              f"counter {counter.item()} (expected {(args.products - 1) * grid})", flush=True)
    rows = torch.empty(2, args.rows, n, device="cuda", dtype=dtype)
    for setting in filter(None, args.whole_k.split(",")):
        bn, bk, ahead = (int(v) for v in setting.split("x"))
        grid = triton.cdiv(n, bn)
        if ahead not in (1, 2):
            p.error(f"--whole-k {setting}: blocks read ahead are 1 or 2")
        if grid > 2 * sms:  # (as above: every program waits for all the others)
            print(f"persistent, whole K, {bn}x{bk}: {grid} programs, more than 2 an SM ({sms} SMs): skipped")
            continue
        us = graph_time(lambda bn=bn, bk=bk, ahead=ahead: whole_k_chain(x, weights, rows, counter, bn, bk, ahead))
        err = (rows[args.products % 2].float() - reference).abs().max().item()
        label = f"persistent, whole K, {bn}x{bk} ({grid} programs), {ahead} ahead"
        print(f"{label:<42} {us:9.1f} us  {us / args.products:6.2f} us a product  max|d| {err:.2e}  "
              f"counter {counter.item()} (expected {(args.products - 1) * grid})", flush=True)

    bufs = torch.empty(2, args.rows, n, device="cuda", dtype=dtype)

    def kernel_a_product(label, product):  # the chain with `product(y, w, out)` a kernel each, timed
        def chain():
            y = x
            for i, w in enumerate(weights):
                y = product(y, w, bufs[i % 2])
            return y

        us = graph_time(chain)
        err = (chain().float() - reference).abs().max().item()
        print(f"{label:<42} {us:9.1f} us  {us / args.products:6.2f} us a product  max|d| {err:.2e}", flush=True)

    for setting in filter(None, args.tiles.split(",")):
        bn, bk, first, warps = (int(v) for v in setting.split("x"))
        if k % bk:
            print(f"a kernel a product, {setting}: K = {k} is not whole blocks of {bk}: skipped")
            continue
        kernel_a_product(f"a kernel a product, PDL, {bn}x{bk}, {min(first, k // bk)} of {k // bk} blocks first, "
                         f"{warps} warps", lambda y, w, out, s=(bn, bk, first, warps): tile_first(y, w, out, *s))
    for setting in filter(None, args.prefetched.split(",")):
        bn, bk, warps, stages = (int(v) for v in setting.split("x"))
        kernel_a_product(f"a kernel a product, PDL, L2 prefetch, {bn}x{bk}, {warps} warps, {stages} stages",
                         lambda y, w, out, s=(bn, bk, warps, stages): prefetched(y, w, out, *s))

if __name__ == "__main__":
    main()
