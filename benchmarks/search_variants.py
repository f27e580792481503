"""The search around the decoder step, each way the package can run it, in one process on one GPU: a model copy
per variant (module switches set while its loop body compiles and is captured), the variants' timed calls
alternating, best of --repeats; ms per step, the ratio to the first variant, whether the tokens (and, for beam
search, the sequence scores) equal the first variant's, and the GPU kernels of a profiled call per step.

    python benchmarks/search_variants.py --shape blenderbot-400M-distill --workloads beam10-b1,greedy-b8 --ngram 3

Variants (--variants; each with generate(kernels=True)):
  copies     the loop body's new state frozen by a `where` and copied into its buffers per value, torch.topk
             for beam search's short top-k (the package before 2026-11-27, evening)
  ranks      the short top-k by ranks (generation.RANK_TOP_K)
  state      also the new state written by one kernel (generation.STATE_KERNEL); the decoder step a graph
             break of the compiled search (the package before 2026-11-27, night)
  package    the package's settings: also the step one operator of the compiled search's graph
             (generation.STEP_OPERATOR)
  rows16     batches of 17-32 rows through the compiled step (kernels.ROWS_M = 16: the package before
             2026-11-27, latest)
  rows32     batches of 33-64 rows through the compiled step (kernels.ROWS_M = 32: the package before
             2026-11-28, evening)
  cublaslt   the package with cuBLASLt preferred for PyTorch's products while the variant compiles, captures
             and runs (torch.backends.cuda.preferred_blas_library; the compiled step of more than 16 rows, 3B)
  flag-copy  whether the loop goes on copied to the host by a launch after each replay, not by the captured
             graph (CudaGraphLoop.FLAG_IN_GRAPH = False: the package before 2026-11-28)
  autotune   the package with the model's compile mode "max-autotune-no-cudagraphs" (its decoding_options):
             the compiled step (more than 32 rows, 3B) with inductor's autotuned products (Triton's templates
             where they beat cuBLAS)
  one-chain  a step of 17-32 rows as one chain of kernels (kernels.GROUPS = False: the package before
             2026-11-28, evening), not two groups of rows on streams of their own at once

`--top-k`: the top-k alone instead (a CUDA graph of 10 calls replayed, us a call): torch.topk, kernels.top_k
with each pass's warps a program, and the short top-k by ranks compiled, at beam search's shapes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
from benchmark_generate import WORKLOADS, make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, generation, kernels

PACKAGE = {"STATE_KERNEL": generation.STATE_KERNEL, "RANK_TOP_K": generation.RANK_TOP_K,
           "STEP_OPERATOR": generation.STEP_OPERATOR, "kernels.ROWS_M": kernels.ROWS_M, "kernels.GROUPS": kernels.GROUPS,
           "CudaGraphLoop.FLAG_IN_GRAPH": generation.CudaGraphLoop.FLAG_IN_GRAPH,
           "blas": str(torch.backends.cuda.preferred_blas_library()).rpartition(".")[2].lower()}
VARIANTS = {
    "copies": {**PACKAGE, "STATE_KERNEL": False, "RANK_TOP_K": 0, "STEP_OPERATOR": False},
    "ranks": {**PACKAGE, "STATE_KERNEL": False, "RANK_TOP_K": 64, "STEP_OPERATOR": False},
    "state": {**PACKAGE, "STATE_KERNEL": True, "RANK_TOP_K": 64, "STEP_OPERATOR": False},
    "package": PACKAGE,
    "rows16": {**PACKAGE, "kernels.ROWS_M": 16},  # 17-32 rows through the compiled step
    "rows32": {**PACKAGE, "kernels.ROWS_M": 32},  # 33-64 rows through the compiled step
    "cublaslt": {**PACKAGE, "blas": "cublaslt"},
    "flag-copy": {**PACKAGE, "CudaGraphLoop.FLAG_IN_GRAPH": False},  # copied by a launch after each replay
    "autotune": {**PACKAGE, "model.mode": "max-autotune-no-cudagraphs"},
    "one-chain": {**PACKAGE, "kernels.GROUPS": False},  # 17-32 rows as one chain of kernels, not two groups
}


def switch(settings: dict) -> None:
    for name, value in settings.items():
        if name.startswith("model."):  # the variant's model copy's decoding options (set once, in main)
            continue
        if name == "blas":
            torch.backends.cuda.preferred_blas_library(value)
            continue
        owner, _, attr = name.rpartition(".")
        setattr({"": generation, "kernels": kernels, "CudaGraphLoop": generation.CudaGraphLoop}[owner], attr, value)


def graphed_us(fn, calls: int = 10, replays: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / replays / calls * 1e6)
    return best


def top_k_table() -> None:
    print(f"{torch.cuda.get_device_name()}: us a call (CUDA graph of 10 calls)")
    ways = {"torch.topk": None, "package": (), "first 1": (1, 4), "first 2": (2, 4), "first 8": (8, 4),
            "merge 1": (4, 1), "merge 2": (4, 2), "merge 8": (4, 8), "both 2": (2, 2), "both 1": (1, 1)}
    print("| rows x values, k | " + " | ".join(ways) + " |")
    print("|---" * (len(ways) + 1) + "|")
    for rows, n, k in ((1, 80080, 20), (4, 80080, 20), (1, 8008, 20), (1, 80080, 10)):
        x = torch.randn(rows, n, device="cuda")
        want = torch.topk(x, k)
        cells = []
        for warps in ways.values():
            if warps is None:
                cells.append(f"{graphed_us(lambda x=x, k=k: torch.topk(x, k)):.1f}")
                continue
            got = kernels.top_k(x, k, warps=warps or None)
            ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            us = graphed_us(lambda x=x, k=k, w=warps: kernels.top_k(x, k, warps=w or None))
            cells.append(f"{us:.1f}" + ("" if ok else " (differs)"))
        print(f"| {rows} x {n:,}, {k} | " + " | ".join(cells) + " |")
    print("| rows x values, k | torch.topk | ranks, compiled |")
    ranks = torch.compile(generation.top_k_by_rank, dynamic=False)
    for rows, n, k in ((1, 20, 10), (1, 30, 10), (8, 20, 10), (1, 64, 32)):
        x = torch.randn(rows, n, device="cuda")
        ok = torch.equal(ranks(x, k)[1], torch.topk(x, k)[1])
        print(f"| {rows} x {n}, {k} | {graphed_us(lambda x=x, k=k: torch.topk(x, k)):.1f} | "
              f"{graphed_us(lambda x=x, k=k: ranks(x, k)):.1f}{'' if ok else ' (differs)'} |")


def timeline(prof, name: str, step: int, marker: str = "_top_k_merge_kernel") -> None:
    """The kernels of one period of the loop, in order: start (us from the period's start), duration, name;
    runs of the decoder's kernels in one line each."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    marks = [i for i, e in enumerate(events) if e.name == marker]
    if len(marks) <= step:
        print(f"{name}: fewer than {step + 1} {marker} kernels")
        return
    period = events[marks[step - 1]:marks[step] + 1]
    t0 = period[0].time_range.start
    print(f"\n{name}: one period, {len(period)} kernels, "
          f"{period[-1].time_range.end - t0:.1f} us from the first kernel's start to the last one's end")
    run = []

    def flush():
        if run:
            print(f"{run[0].time_range.start - t0:8.1f} {run[-1].time_range.end - run[0].time_range.start:7.1f}  "
                  f"{len(run)} decoder kernels")
            run.clear()

    for e in period:
        if e.name in ("_rows_kernel", "_attention_kernel", "_linear_kernel"):
            run.append(e)
            continue
        flush()
        print(f"{e.time_range.start - t0:8.1f} {e.time_range.end - e.time_range.start:7.1f}  {e.name[:110]}")
    flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workloads", default="beam10-b1")
    p.add_argument("--variants", default="copies,ranks,state")
    p.add_argument("--ngram", type=int, default=3, help="no_repeat_ngram_size and encoder_no_repeat_ngram_size")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--context", type=int, default=40, help="tokens of each input")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--top-k", action="store_true", help="time the top-k kernels alone")
    p.add_argument("--timeline", type=int, default=0, metavar="STEP",
                   help="also print each variant's GPU kernels in order over one period of the loop, from its "
                        "STEP-th long top-k's second pass to the next (decoder kernels in runs)")
    args = p.parse_args(argv)
    if args.top_k:
        return top_k_table()
    torch.manual_seed(0)
    config = make_config(args.shape)
    base = BlenderbotForConditionalGeneration(config).to("cuda", getattr(torch, args.dtype)).eval()
    names = args.variants.split(",")
    models = {name: copy.deepcopy(base) for name in names}
    for name, model in models.items():
        options = {k.partition(".")[2]: v for k, v in VARIANTS[name].items() if k.startswith("model.")}
        model.decoding_options = dataclasses.replace(model.decoding_options, **options)
    print(f"{torch.cuda.get_device_name()}, {args.shape} {args.dtype}, {args.context}-token inputs, "
          f"{args.new_tokens} new tokens, n-gram {args.ngram}")
    for workload in args.workloads.split(","):
        batch, beams = WORKLOADS[workload]
        ids = torch.randint(4, config.vocab_size, (batch, args.context), device="cuda", generator=None)
        settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=beams,
                        no_repeat_ngram_size=args.ngram, encoder_no_repeat_ngram_size=args.ngram, kernels=True,
                        return_dict_in_generate=True)

        def call(name, ids=ids, settings=settings):
            switch(VARIANTS[name])
            with torch.no_grad():
                out = models[name].generate(ids, **settings)
            torch.cuda.synchronize()
            return out

        outs = {name: call(name) for name in names}  # compile, capture
        best = dict.fromkeys(names, float("inf"))
        for _ in range(args.repeats):
            for name in names:
                start = time.perf_counter()
                outs[name] = call(name)
                best[name] = min(best[name], time.perf_counter() - start)
        kernels_per_step = {}
        if not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            for name in names:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    call(name)
                count = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
                kernels_per_step[name] = count / args.new_tokens
            if args.timeline:
                for name in names:
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        call(name)
                    timeline(prof, name, args.timeline, "_top_k_merge_kernel" if beams > 1 else "_write_state_kernel")
        first = names[0]
        for name in names:
            ms = best[name] * 1000 / args.new_tokens
            same = torch.equal(outs[name].sequences, outs[first].sequences)
            scores = outs[name].sequences_scores
            diff = (None if scores is None else float((scores.float() - outs[first].sequences_scores.float())
                                                      .abs().max()))
            row = dict(workload=workload, variant=name, ms_per_step=round(ms, 4),
                       ratio=round(best[name] / best[first], 3), same_tokens=same, score_diff=diff,
                       kernels_per_step=round(kernels_per_step.get(name, 0), 1))
            print(f"{workload:12s} {name:11s} {ms:7.4f} ms/step  x{row['ratio']:.3f}  same tokens {same}"
                  f"  score diff {diff}  kernels/step {row['kernels_per_step']}")
            print(json.dumps(row))
    switch(PACKAGE)


if __name__ == "__main__":
    main()
