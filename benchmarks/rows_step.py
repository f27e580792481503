"""The decoder step of several rows with the several-row product kernel (`kernels._rows_kernel`) under launch
settings, beside the fused step compiled around the attention kernel, each captured as generate() captures it
and replayed (CUDA graphs, one GPU):

    python benchmarks/rows_step.py --shape blenderbot-400M-distill --rows 10,16,32
    python benchmarks/rows_step.py --rows 10 --profile     # where a step's time goes, kernel by kernel

Variants (every product of the step with the same settings, `kernels.ROWS_OVERRIDES`): the package's
(`kernels.rows_config`: 32 outputs a program where that makes at most 64 programs, else 64), 32 or 64
outputs a program everywhere, and 32 rows a program. Each step reads the same cache (filled at random, step
index 60 of 128 positions, 40 encoder positions in a bucket of 64); the largest logit difference to the
compiled step is printed (bf16 steps round differently). --profile prints, per kernel and product, the time
from the end of the kernel before to its own end (under programmatic dependent launch kernels overlap, so
their own durations add up to more than the step).
"""

from __future__ import annotations

import argparse
import collections

import torch
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, kernels
from blenderbot_mb.torch.decoding import DecodingOptions
from blenderbot_mb.torch.generation import CudaGraphStep

ROWS_M = kernels.ROWS_M  # the package's limit, set back after each comparison


def variants(config) -> dict:
    d, f, v = config.d_model, config.decoder_ffn_dim, config.vocab_size
    shapes = [(3 * d, d), (d, d), (f, d), (d, f), (v, d)]
    R = kernels.RowsConfig
    return {
        "package settings": {},
        "32 outputs a program": {s: R(block_n=32) for s in shapes},
        "64 outputs a program": {s: R(block_n=64) for s in shapes},
        "32 rows a program": {s: R(block_n=32 if s == (d, d) else 64, block_m=32) for s in shapes},
    }


def make_step(model, rows, rows_kernel: bool, overrides: dict, cross, filled):
    kernels.ROWS = rows_kernel
    kernels.ROWS_M = max(kernels.ROWS_M, rows)  # (the package's limit applies to generate(), not to this comparison)
    kernels.ROWS_OVERRIDES.clear()
    kernels.ROWS_OVERRIDES.update(overrides)
    model.__dict__.pop("_cuda_graph_steps", None)
    step = CudaGraphStep(model, rows=rows, max_length=128, encoder_length=64, dtype=model.dtype, device="cuda",
                         options=DecodingOptions(fused=True, kernels=True).for_rows(model, rows))
    for i, (k, v) in enumerate(cross):  # the encoder's 40 positions, the rest of the bucket masked
        step.cross[i, 0, :, :, :k.shape[2]].copy_(k)
        step.cross[i, 1, :, :, :v.shape[2]].copy_(v)
    step.mask.zero_()[:, :40] = 1
    for i, buffer in enumerate(step.cache.buffers):
        buffer.copy_(filled[i])
    if step.cache.table is not None:  # each row reads its own cache row
        step.cache.table.copy_(torch.arange(rows, device="cuda", dtype=step.cache.table.dtype)[:, None]
                               .expand_as(step.cache.table))
    step.tokens.fill_(5)
    step.index.fill_(60)
    step.graph.replay()
    torch.cuda.synchronize()
    return step, step.logits.float().clone()


def replay_us(step, repeats: int = 100) -> float:
    """us a replay of a captured step (a CudaGraphStep, or its CUDA graph itself)."""
    graph = getattr(step, "graph", step)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


def profile(step, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(20):
        step.graph.replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    names = {0: "qkv", 1: "out", 2: "cross q", 3: "cross out", 4: "fc1", 5: "fc2"}  # a layer's products in order
    seen, table = collections.Counter(), collections.defaultdict(lambda: [0, 0.0, 0.0])
    last_end = events[0].time_range.start
    for e in events:
        key = e.name[:50]
        if "_rows_kernel" in key or "_linear_kernel" in key:  # a layer's six products in order, then the LM head
            seen[key] += 1
            key = f"{key} {names.get((seen[key] - 1) % 6, '') if seen[key] <= 72 else 'LM head'}"
        elif "_attention_kernel" in key:
            seen[key] += 1
            key = f"{key} {'self' if seen[key] % 2 == 1 else 'cross'}"
        row = table[key]
        row[0] += 1
        row[1] += max(0.0, e.time_range.end - last_end)
        row[2] += e.time_range.end - e.time_range.start
        last_end = max(last_end, e.time_range.end)
    print(f"\n# {label}: {len(events)} kernels, {events[-1].time_range.end - events[0].time_range.start:.1f} us")
    for key, (n, gap, own) in sorted(table.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"{key:<62} x{n:4d}  end to end {gap:8.1f} us ({gap / n:5.2f} each)  own {own / n:5.2f} each")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="10,16,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="the package settings and the compiled step, profiled")
    args = p.parse_args(argv)
    config = make_config(args.shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BlenderbotForConditionalGeneration(config).eval().to(getattr(torch, args.dtype))
    d, heads = config.d_model, config.decoder_attention_heads
    print(f"# {args.shape} {torch.cuda.get_device_name()} {args.dtype} torch {torch.__version__}")
    for rows in (int(r) for r in args.rows.split(",")):
        cross = model._cross_kv(torch.randn(rows, 40, d, device="cuda", dtype=model.dtype), 1)
        g = torch.Generator(device="cuda").manual_seed(0)
        filled = torch.randn(config.decoder_layers, 2, rows, heads, 128, d // heads, generator=g, device="cuda",
                             dtype=model.dtype)
        todo = {"compiled step": (False, {})}
        todo.update({name: (True, o) for name, o in variants(config).items()
                     if not args.profile or name == "package settings"})
        steps = {name: make_step(model, rows, *how, cross, filled) for name, how in todo.items()}
        kernels.ROWS, kernels.ROWS_M = True, ROWS_M
        kernels.ROWS_OVERRIDES.clear()
        if args.profile:
            for name, (step, _) in steps.items():
                profile(step, f"{rows} rows, {name}")
            continue
        times = {name: [] for name in steps}
        for _ in range(args.rounds):  # alternating
            for name, (step, _) in steps.items():
                times[name].append(replay_us(step))
        reference = steps["compiled step"][1]
        for name, (_, logits) in steps.items():
            print(f"{rows:3d} rows  {name:<24} {min(times[name]):8.1f} us a step  max |dlogit| vs the compiled step "
                  f"{(logits - reference).abs().max().item():.3f}", flush=True)


if __name__ == "__main__":
    main()
