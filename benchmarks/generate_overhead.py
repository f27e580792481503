"""Where a PyTorch generate() call's time goes on a GPU, beyond the decoder step: the fixed cost of a call and
the cost of each token, from calls of 4, 8, 30 and 60 new tokens (least squares), and one 60-token call
profiled (torch.profiler): GPU kernels grouped by name, with their count and total time, against the call's
wall time.

    python benchmarks/generate_overhead.py --shape blenderbot-400M-distill --settings kernels=True
    python benchmarks/generate_overhead.py --shape blenderbot-400M-distill --settings fused=True,compile=True
"""

from __future__ import annotations

import argparse
import ast
import time
from collections import defaultdict

import numpy as np
import torch
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, generation


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--settings", default="kernels=True", help="generate() keyword arguments, a=b,c=d")
    p.add_argument("--ngram", type=int, default=0, help="no_repeat_ngram_size and encoder_no_repeat_ngram_size")
    p.add_argument("--eager-search", action="store_true",
                   help="the device loop's search not compiled (generation.COMPILE_SEARCH off)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--cprofile", type=int, default=0, metavar="TOKENS",
                   help="also the host's Python profile of 20 calls of TOKENS new tokens")
    p.add_argument("--no-kernel-profile", action="store_true", help="skip the profiled 60-token call")
    p.add_argument("--lengths", default="4,8,30,60",
                   help="new tokens of the timed calls (each length compiles and captures a loop of its own on "
                        "its first call: fewer lengths, a shorter job)")
    args = p.parse_args(argv)
    generation.COMPILE_SEARCH = not args.eager_search
    settings = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.settings.split(",") if kv)}
    config = make_config(args.shape)
    model = BlenderbotForConditionalGeneration(config).to("cuda", getattr(torch, args.dtype)).eval()
    ids = torch.randint(4, config.vocab_size, (args.rows, 40), device="cuda")

    def call(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, num_beams=args.beams,
                       no_repeat_ngram_size=args.ngram, encoder_no_repeat_ngram_size=args.ngram, **settings)
        torch.cuda.synchronize()

    counts, times = [int(n) for n in args.lengths.split(",")], []  # (calls of 1-2 tokens never reach the
    # capture of a device loop's body)
    for n in counts:
        call(n)  # compile, capture
    for n in counts:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            call(n)
            best = min(best, time.perf_counter() - start)
        times.append(best * 1000)
    print(f"{args.shape} {args.dtype} rows {args.rows} beams {args.beams} {settings}: "
          + ", ".join(f"{n} tokens {t:.2f} ms" for n, t in zip(counts, times, strict=True)))
    if len(set(counts)) > 1:
        slope, fixed = np.polyfit(counts, times, 1)
        print(f"fixed {fixed:.2f} ms per call, {slope * 1000:.1f} us per token")
    print(f"{counts[-1]} tokens: {times[-1] / counts[-1] * 1000:.1f} us per token all told")
    if args.cprofile:
        import cProfile
        import pstats

        with cProfile.Profile() as host:
            for _ in range(20):
                call(args.cprofile)
        pstats.Stats(host).sort_stats("cumulative").print_stats(args.top)
        pstats.Stats(host).sort_stats("tottime").print_stats(args.top)
    if args.no_kernel_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call(60)
        wall = (time.perf_counter() - start) * 1e6
    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name][0] += 1
            kernels[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    busy = sum(t for _, t in kernels.values())
    print(f"\nprofiled 60-token call: wall {wall / 1000:.2f} ms, GPU kernels {busy / 1000:.2f} ms "
          f"({sum(c for c, _ in kernels.values())} kernels)")
    for name, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{total:9.1f} us {count:6d}x  {name[:100]}")


if __name__ == "__main__":
    main()
