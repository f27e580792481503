"""The Triton kernels of the decoder step (blenderbot_mb.torch.kernels) timed on a GPU at a model's real shapes,
beside what they replace, in one process:

    python benchmarks/kernel_step.py --shape blenderbot-400M-distill --rows 1,10,32 [--sweep]
    python benchmarks/kernel_step.py --shape blenderbot-3B --rows 1 --parts step

Parts (--parts, default all):
  linear   each product of a decoder layer and the LM head as `kernels.linear` runs it (qkv with the norm
           before it, out and fc2 with the residual, fc1 with the norm and gelu, the head into float32)
           beside F.linear alone (cuBLAS, no norm, no epilogue); with --sweep every launch setting of a grid,
           the best kept for the step part (and printed as `kernels.OVERRIDES` entries)
  attention  the self-attention kernel (with its cache write) and the cross-attention kernel beside
           scaled_dot_product_attention
  step     the whole step: kernels=True against the fused step compiled (fused=True, compile=True), each
           captured as generate() captures it (generation.CudaGraphStep) and replayed; the largest logit
           difference between the two on the same cache; kernels=True also without programmatic dependent
           launch, with the embedding looked up before the first kernel, and with the launch settings of
           other GPUs (kernels.linear_config(gpu=""))
Each kernel time is the mean over a CUDA graph of repeated calls (triton.testing.do_bench_cudagraph), in us.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from functools import partial

import torch
import torch.nn.functional as F
import triton
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, kernels
from blenderbot_mb.torch.decoding import DecodingOptions
from blenderbot_mb.torch.generation import CudaGraphStep


def bench(fn) -> float:
    """Microseconds per call of fn, replayed in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1000


def candidates():
    for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)):
        yield kernels.LinearConfig(block_n=n, block_k=k, warps=w, stages=s)


def cold(fn, *tensors):
    """fn over copies of `tensors` (the weights) filling 4x a 50 MB L2: each call reads its weights from memory,
    as in a step that reads every layer's once. Returns (a function of the copy, the number of copies)."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    copies = [[t.clone() for t in tensors] for _ in range(max(2, -(-200 * 2**20 // size)))]

    def run():
        for c in copies:
            fn(*c)

    return run, len(copies)


def products(config, rows, dtype):
    """(name, x, weight, bias, keyword arguments of kernels.linear) for each product of a layer and the head."""
    d, f, v = config.d_model, config.decoder_ffn_dim, config.vocab_size

    def t(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", dtype=dt) * 0.02

    ln = torch.nn.LayerNorm(d, device="cuda", dtype=dtype)
    return [("qkv", t(rows, d), t(3 * d, d), t(3 * d), dict(norm=ln)),
            ("out", t(rows, d), t(d, d), t(d), dict(residual=t(rows, d))),
            ("cross_q", t(rows, d), t(d, d), t(d), dict(norm=ln)),
            ("fc1", t(rows, d), t(f, d), t(f), dict(norm=ln, activation="gelu")),
            ("fc2", t(rows, f), t(d, f), t(d), dict(residual=t(rows, d))),
            ("head", t(rows, d), t(v, d), t(v, dt=torch.float32), dict(norm=ln, out_dtype=torch.float32))]


def timed(fn, x, w, b, kw, from_memory: bool) -> float:
    """us per call of fn(x, w, b, **kw): L2-warm (the same weight again and again), or each weight read from
    memory (`from_memory`: copies of it in turn)."""
    if not from_memory:
        return bench(partial(fn, x, w, b, **kw))
    many, count = cold(lambda w, b: fn(x, w, b, **kw), w, b)
    return bench(many) / count


def linear_part(config, rows, dtype, sweep: bool, from_memory: bool = False):
    layers = config.decoder_layers
    per_layer = {"qkv": 1, "out": 2, "cross_q": 1, "fc1": 1, "fc2": 1, "head": 0}  # out: self and cross
    total = {"triton": 0.0, "cublas": 0.0, "compiled": 0.0}
    print(f"\n# products, {rows} rows: us per call (Triton default / best of sweep / F.linear alone / the "
          f"compiled step's norm, product and epilogue), weights {'from memory' if from_memory else 'L2-warm'}")
    for name, x, w, b, kw in products(config, rows, dtype):
        n, k = w.shape
        default = timed(kernels.linear, x, w, b, kw, from_memory)
        cublas = timed(lambda x, w, b, **_: F.linear(x, w, b.to(x.dtype)), x, w, b, kw, from_memory)
        compiled = timed(compiled_product, x, w, b, kw, from_memory)
        best = default
        best_cfg = kernels.linear_config(n, k, torch.cuda.get_device_name())
        if sweep:
            for cfg in candidates():
                try:
                    us = timed(partial(kernels.linear, config=cfg), x, w, b, kw, from_memory)
                except Exception as e:  # a setting Triton can't compile (too many registers...) is skipped
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                if us < best:
                    best, best_cfg = us, cfg
            kernels.OVERRIDES[n, k] = best_cfg
        want = F.linear(kw["norm"](x) if "norm" in kw else x, w, b.to(x.dtype))
        if kw.get("activation"):
            want = F.gelu(want)
        if "residual" in kw:
            want = want + kw["residual"]
        err = (kernels.linear(x, w, b, **kw).float() - want.float()).abs().max().item()
        count = per_layer[name] * layers or 1
        total["triton"] += best * count
        total["cublas"] += cublas * count
        total["compiled"] += compiled * count
        gb = w.numel() * w.element_size() / best / 1e3
        print(f"{name:<8} [{n}x{k}] {default:7.2f} {best:7.2f} {cublas:7.2f} {compiled:7.2f}  x{count:<3} "
              f"{gb:6.0f} GB/s  max|d| {err:.2e}  {best_cfg}")
    print(f"products of one step: Triton {total['triton']:.0f} us, F.linear {total['cublas']:.0f} us, compiled "
          f"{total['compiled']:.0f} us")


@functools.cache
def _compiled():
    def product(x, w, b, norm_w, norm_b, residual, act: bool):
        if norm_w is not None:
            x = F.layer_norm(x, x.shape[-1:], norm_w, norm_b)
        y = F.linear(x, w, b.to(x.dtype))
        if act:
            y = F.gelu(y)
        return y if residual is None else y + residual

    torch._dynamo.config.recompile_limit = 64  # one graph per product's parts and shapes
    return torch.compile(product, fullgraph=True, dynamic=False)


def compiled_product(x, w, b, norm=None, activation=None, residual=None, out_dtype=None):
    """What the compiled fused step runs for this product: inductor's norm kernel, cuBLAS, its epilogue."""
    y = _compiled()(x, w, b, norm.weight if norm is not None else None, norm.bias if norm is not None else None,
                    residual, activation is not None)
    return y if out_dtype is None else y.to(out_dtype)


def attention_part(config, rows, dtype):
    heads = config.decoder_attention_heads
    hd, d = config.d_model // heads, config.d_model
    length, source = 128, 64
    kv = torch.randn(2, rows, heads, length, hd, device="cuda", dtype=dtype)
    qkv = torch.randn(rows, 3 * d, device="cuda", dtype=dtype)
    index = torch.tensor([length // 2], device="cuda")
    cross = torch.randn(2, rows, heads, source, hd, device="cuda", dtype=dtype)
    mask = torch.ones(rows, source, dtype=torch.long, device="cuda")
    mask[:, 40:] = 0
    bias = torch.zeros(length, device="cuda", dtype=dtype).masked_fill(torch.arange(length, device="cuda") > index,
                                                                      torch.finfo(dtype).min)[None, None, None]
    cross_bias = torch.zeros(rows, 1, 1, source, device="cuda", dtype=dtype).masked_fill(
        mask[:, None, None] == 0, torch.finfo(dtype).min)
    q = qkv[:, :d].reshape(rows, heads, 1, hd)

    def sdpa_self():
        kv.index_copy_(3, index, qkv[:, d:].view(rows, 2, heads, 1, hd).transpose(0, 1))
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)

    table = torch.randint(0, rows, (rows, length), dtype=torch.int32, device="cuda")  # beam search's reordering
    print(f"\n# attention, {rows} rows, cache {length} (index {length // 2}), {source} encoder positions (40 kept): us"
          "; self with a beam table")
    for block_l, warps in itertools.product((None, 16, 32, 64), (1, 2, 4, 8)):
        ours = bench(partial(kernels.attention, qkv, kv[0], kv[1], heads=heads, index=index, new=qkv[:, d:],
                             block_l=block_l, warps=warps))
        ours_t = bench(partial(kernels.attention, qkv, kv[0], kv[1], heads=heads, index=index, new=qkv[:, d:],
                               table=table, write=False, block_l=block_l, warps=warps))
        ours_x = bench(partial(kernels.attention, qkv, cross[0], cross[1], heads=heads, mask=mask, block_l=block_l,
                               warps=warps))
        print(f"block_l {block_l or 'all':<4} warps {warps}  self {ours:6.2f}  table {ours_t:6.2f}  cross {ours_x:6.2f}")
    print(f"sdpa     self {bench(sdpa_self):6.2f} (with the cache write)  cross "
          f"{bench(lambda: F.scaled_dot_product_attention(q, cross[0], cross[1], attn_mask=cross_bias)):6.2f}")


def step_part(model, config, rows, dtype):
    d, heads = config.d_model, config.decoder_attention_heads
    enc = torch.randn(rows, 40, d, device="cuda", dtype=dtype)
    cross = model._cross_kv(enc, 1)
    steps, logits = {}, {}
    g = torch.Generator(device="cuda").manual_seed(0)
    filled = torch.randn(config.decoder_layers, 2, rows, heads, 128, d // heads, generator=g, device="cuda",
                         dtype=dtype)
    on = DecodingOptions(fused=True, kernels=True)
    d, f, v = config.d_model, config.decoder_ffn_dim, config.vocab_size
    others = {(n, k): kernels.linear_config(n, k) for n, k in ((3 * d, d), (d, d), (f, d), (d, f), (v, d))}
    for name, options, change in (("kernels", on, {}), ("kernels-no-pdl", on, dict(PDL=False)),
                                  ("kernels-lookup", on, dict(FOLD_EMBEDDING=False)),
                                  ("kernels-generic-settings", on, dict(OVERRIDES={**others, **kernels.OVERRIDES})),
                                  ("fused-compile", DecodingOptions(fused=True, compile=True), {})):
        saved = {key: getattr(kernels, key) for key in change}
        for key, value in change.items():  # read when the step is captured
            setattr(kernels, key, value)
        model.__dict__.pop("_cuda_graph_steps", None)
        step = CudaGraphStep(model, rows=rows, max_length=128, encoder_length=64, dtype=dtype, device="cuda",
                             options=options.for_rows(model, rows))
        for key, value in saved.items():
            setattr(kernels, key, value)
        for i, (k, v) in enumerate(cross):  # the encoder's 40 positions, the rest of the bucket masked
            step.cross[i, 0, :, :, :k.shape[2]].copy_(k)
            step.cross[i, 1, :, :, :v.shape[2]].copy_(v)
        step.mask.zero_()[:, :enc.shape[1]] = 1
        for i, buffer in enumerate(step.cache.buffers):  # the same cache contents for both
            buffer.copy_(filled[i])
        step.tokens.fill_(5)
        step.index.fill_(60)
        step.graph.replay()
        logits[name] = step.logits.clone()
        steps[name] = step
    times = {}
    for name, step in steps.items():
        step.graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            step.graph.replay()
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 200 * 1000
    err = (logits["kernels"] - logits["fused-compile"]).abs().max().item()
    same = {name: torch.equal(logits["kernels"], x) for name, x in logits.items() if name.startswith("kernels-")}
    print(f"\n# whole step, {rows} rows: kernels {times['kernels']:.1f} us (without programmatic dependent launch "
          f"{times['kernels-no-pdl']:.1f}; the embedding looked up by its own kernels "
          f"{times['kernels-lookup']:.1f}; with the launch settings for other GPUs "
          f"{times['kernels-generic-settings']:.1f}; same logits: {same}), fused-compile "
          f"{times['fused-compile']:.1f} us, ratio {times['kernels'] / times['fused-compile']:.3f}, max |dlogit| "
          f"{err:.3e} (bf16 steps differ in rounding)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="1,10,32")
    p.add_argument("--parts", default="linear,attention,step")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--from-memory", action="store_true",
                   help="products: each call reads its weight from memory (copies in turn), not from the L2")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = make_config(args.shape)
    parts = args.parts.split(",")
    print(f"[setup] {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"{args.shape} {args.dtype}")
    model = None
    if "step" in parts:
        model = BlenderbotForConditionalGeneration(config).to("cuda", dtype).eval()
    for rows in [int(r) for r in args.rows.split(",")]:
        with torch.no_grad():
            if "linear" in parts:
                linear_part(config, rows, dtype, args.sweep, args.from_memory)
            if "attention" in parts:
                attention_part(config, rows, dtype)
            if "step" in parts:
                step_part(model, config, rows, dtype)
    if kernels.OVERRIDES:
        print("\n# best settings found:")
        for key, cfg in sorted(kernels.OVERRIDES.items()):
            print(f"{key}: {cfg}")


if __name__ == "__main__":
    main()
