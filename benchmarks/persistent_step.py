"""Several rows' decoder step as persistent kernels (blenderbot_mb.torch.persistent) against the step it
replaces (the fused step compiled around the Triton attention kernel), each captured as generate() captures it
(generation.CudaGraphStep) and replayed, on the same cache contents:

    python benchmarks/persistent_step.py --shape blenderbot-400M-distill --rows 10,32 \\
        [--variants default,programs=2,prefetch=0,stages=2]

Variants change module settings of persistent.py, joined by + (programs: PROGRAMS_PER_SM, block_n: BLOCK_N,
block_k: BLOCK_K, block_l: BLOCK_L, heads: HEADS, warps: WARPS, run: RUN, the stages run as a bit mask, e.g. run=0 for the barriers alone,
run=18 for the attention alone, run=237 for the products alone). Prints us per step and the largest logit difference to the compiled step (bf16
steps differ in rounding; float32 steps are tested equal in tests/).
"""

from __future__ import annotations

import argparse

import torch
import triton
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, persistent
from blenderbot_mb.torch.decoding import DecodingOptions
from blenderbot_mb.torch.generation import CudaGraphStep

SETTINGS = dict(programs="PROGRAMS_PER_SM", block_n="BLOCK_N", block_k="BLOCK_K", block_l="BLOCK_L", heads="HEADS",
                warps="WARPS", run="RUN")


def replay_us(step, repeats: int = 200) -> float:
    step.graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="10,32")
    p.add_argument("--variants", default="default")
    p.add_argument("--index", type=int, default=60, help="the step index (cache positions attended)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = make_config(args.shape)
    print(f"# {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs) "
          f"torch {torch.__version__} triton {triton.__version__} {args.shape} {args.dtype}, step index {args.index}")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BlenderbotForConditionalGeneration(config).eval().to(dtype)
    d, heads = config.d_model, config.decoder_attention_heads
    defaults = {name: getattr(persistent, attr) for name, attr in SETTINGS.items()}
    for rows in [int(r) for r in args.rows.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(rows)
        enc = torch.randn(rows, 40, d, device="cuda", dtype=dtype, generator=g)
        cross = model._cross_kv(enc, 1)
        filled = torch.randn(config.decoder_layers, 2, rows, heads, 128, d // heads, generator=g, device="cuda",
                             dtype=dtype)
        table = torch.randint(0, rows, (rows, 128), generator=g, device="cuda", dtype=torch.int32)
        results = {}
        for variant in ["compiled", *args.variants.split(",")]:
            change = {}
            if variant not in ("compiled", "default"):
                for item in variant.split("+"):
                    name, _, value = item.partition("=")
                    change[SETTINGS[name]] = int(value)
            for attr, value in change.items():
                setattr(persistent, attr, value)
            persistent.ENABLED = variant != "compiled"
            persistent._programs.cache_clear()
            options = DecodingOptions(fused=True, kernels=True).for_rows(model, rows)
            model.__dict__.pop("_decode_functions", None)
            try:
                step = CudaGraphStep(model, rows=rows, max_length=128, encoder_length=64, dtype=dtype, device="cuda",
                                     options=options)
                for i, (k, v) in enumerate(cross):  # the encoder's 40 positions, the rest of the bucket masked
                    step.cross[i, 0, :, :, :k.shape[2]].copy_(k)
                    step.cross[i, 1, :, :, :v.shape[2]].copy_(v)
                step.mask.zero_()[:, :enc.shape[1]] = 1
                for i in range(config.decoder_layers):
                    step.cache.buffers[i].copy_(filled[i])
                step.cache.table.copy_(table)
                step.tokens.copy_(torch.arange(rows, device="cuda") + 5)
                step.index.fill_(args.index)
                step.graph.replay()
                logits = step.logits.clone()
                us = replay_us(step)
                results[variant] = us, logits
                err = (logits - results["compiled"][1]).abs().max().item()
                print(f"rows {rows:>3} {variant:<28} {us:9.1f} us a step  {us / results['compiled'][0]:6.3f}x compiled"
                      f"  max |dlogit| {err:.3e}", flush=True)
            except Exception as e:  # a variant that fails is reported, the others still run
                print(f"rows {rows:>3} {variant:<28} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            finally:
                for attr, value in defaults.items():
                    setattr(persistent, SETTINGS[attr] if attr in SETTINGS else attr, value)
    persistent.ENABLED = True


if __name__ == "__main__":
    main()
