"""Where a PyTorch decoding step's time goes on a GPU: CUDA-graph capture, one graph replay, one eager step,
and the whole generate() loop per step, for one shape (random weights).

    python benchmarks/step_breakdown.py --shape 400M-distill --dtype bfloat16 --rows 1
"""

from __future__ import annotations

import argparse
import time

import torch

from blenderbot_mb import BlenderbotConfig
from blenderbot_mb.search import prepare
from blenderbot_mb.torch import BlenderbotForConditionalGeneration


def timed(fn, n: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--max-length", type=int, default=61)
    args = p.parse_args()
    config = BlenderbotConfig.from_preset(f"blenderbot-{args.shape}")
    model = BlenderbotForConditionalGeneration(config).eval().to("cuda", getattr(torch, args.dtype))
    ids = torch.randint(4, config.vocab_size, (args.rows, args.context), device="cuda")
    n = args.max_length - 1

    def generate(**kwargs):
        model.generate(ids, max_length=args.max_length, min_length=args.max_length, num_beams=1,
                       no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, **kwargs)

    with torch.no_grad():
        # eager first: once a graph has been captured, later eager runs in the process measured ~1.5x slower
        spec = prepare(model.generation_config, config, dict(max_length=args.max_length, num_beams=1)).spec
        inputs = (ids, torch.ones_like(ids))
        eager_step, eager_cache = model._decoder_step(inputs, spec, rows=args.rows, cuda_graph=False)
        tokens = torch.ones(args.rows, dtype=torch.long, device="cuda")
        eager = timed(lambda: eager_step(tokens, 5, eager_cache), 50)
        no_graph = timed(lambda: generate(cuda_graph=False), 3)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step, cache = model._decoder_step(inputs, spec, rows=args.rows, cuda_graph=True)
        torch.cuda.synchronize()
        capture = time.perf_counter() - start
        replay = timed(lambda: step(tokens, 5, cache), 200)
        encoder = timed(lambda: model.get_encoder()(ids, return_dict=True), 20)
        warm = timed(generate, 5)  # the captured step is reused across calls
        cold = timed(lambda: (model.__dict__.pop("_cuda_graph_steps", None), generate()), 3)
    print(f"shape={args.shape} dtype={args.dtype} rows={args.rows}")
    print(f"graph capture (the step and the prefill, 2 warm-ups + capture each): {capture * 1e3:.1f} ms")
    print(f"graph replay per step:  {replay * 1e3:.3f} ms")
    print(f"eager step:             {eager * 1e3:.3f} ms")
    print(f"encoder:                {encoder * 1e3:.3f} ms")
    print(f"generate per step:      {warm / n * 1e3:.3f} ms  ({n} steps, everything included; graph reused)")
    print(f"  with a fresh capture: {cold / n * 1e3:.3f} ms")
    print(f"  without CUDA graphs:  {no_graph / n * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
