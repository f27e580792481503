"""Ways to write the fused decoder step (`decoding.fused_logits`) timed alone on a GPU: each variant compiled
with torch.compile (fullgraph, static shapes), captured as a CUDA graph and replayed, beside the fused step
as generate() runs it, on one model with random weights; plus which kernels one step launches.

    python benchmarks/step_variants.py --shape 400M-distill --rows 1 --variants base,attn,attn-gemv
    python benchmarks/step_variants.py --shape tiny --device cpu --dtype float32 --rows 1   # a quick try

Variants (joined with '+' for inductor settings, e.g. attn-gemv+cd):
  base       the fused step as generate(fused=True, compile=True) runs it
  attn       attention over the cache written as reductions (scores, softmax, weighted sum) instead of
             scaled_dot_product_attention, so inductor generates and fuses it
  gemv       the Linear products of up to 4 rows written as multiply-and-sum, so inductor generates them as
             reductions fused with the layer norm before and the bias, activation and residual after
  attn-gemv  both
  +cd        inductor's coordinate descent tuning of its kernels' launch settings
Prints microseconds per replayed step, the largest logit difference to `base`, and with --profile the
kernels of one step (not replayed: torch.profiler), grouped by name.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, decoding
from blenderbot_mb.torch.modeling import KVCache


def attention_reduce(q, k, v, attn_mask=None):
    """scaled_dot_product_attention for one query position: q [rows, heads, 1, hd], k/v [rows, heads, L, hd],
    attn_mask broadcasting to [rows, heads, 1, L]."""
    s = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # [rows, heads, L]
    if attn_mask is not None:
        s = s + attn_mask[..., 0, :].float()
    p = torch.softmax(s, dim=-1)
    return (p[..., None] * v.float()).sum(-2)[:, :, None, :].to(q.dtype)  # [rows, heads, 1, hd]


def linear_reduce(x, weight, bias):
    """F.linear as multiply-and-sum for up to 4 rows (x [rows, in], weight [out, in])."""
    if x.shape[0] > 4:
        return F.linear(x, weight, bias)
    y = (x[:, None, :].float() * weight.float()).sum(-1)  # [rows, out]
    return (y + bias.float()).to(x.dtype)


def variant(name: str):
    """fused_logits with its attention and/or products replaced (the same code, other globals)."""
    kind, *flags = name.split("+")
    if kind not in ("base", "attn", "gemv", "attn-gemv"):
        raise SystemExit(f"unknown variant {name!r}")
    names = dict(vars(decoding))
    if "attn" in kind:
        names["F"] = types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": attention_reduce})
    if "gemv" in kind:
        names["linear"] = linear_reduce
    fn = decoding.fused_logits
    return types.FunctionType(fn.__code__.replace(), names, fn.__name__, fn.__defaults__, fn.__closure__), flags


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="400M-distill")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="1")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--encoder-length", type=int, default=64)
    p.add_argument("--variants", default="base,attn,gemv,attn-gemv,attn-gemv+cd")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    import torch._inductor.config as inductor_config

    shape = args.shape if args.shape == "tiny" else f"blenderbot-{args.shape}"
    config = make_config(shape)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = BlenderbotForConditionalGeneration(config).eval().to(getattr(torch, args.dtype))
    cuda = args.device == "cuda"
    print(f"# shape={shape} device={torch.cuda.get_device_name() if cuda else 'cpu'} dtype={args.dtype} "
          f"torch={torch.__version__} max_length={args.max_length} encoder_length={args.encoder_length}")
    layers = model.get_decoder().layers
    heads, head_dim = layers[0].self_attn.num_heads, layers[0].self_attn.head_dim
    for rows in [int(r) for r in args.rows.split(",")]:
        dtype, dev = model.dtype, model.device
        buffers = decoding.cache_buffers(len(layers), (2, rows, heads, args.max_length, head_dim), dtype, dev,
                                         per_layer=True)
        for kv in buffers:
            kv.normal_()
        cross = [(torch.randn(rows, heads, args.encoder_length, head_dim, dtype=dtype, device=dev),
                  torch.randn(rows, heads, args.encoder_length, head_dim, dtype=dtype, device=dev))
                 for _ in layers]
        mask = torch.ones(rows, args.encoder_length, dtype=torch.long, device=dev)
        mask[:, -7:] = 0
        index = torch.full((1,), args.max_length // 2, dtype=torch.long, device=dev)
        cache = KVCache(len(layers), cross_kv=cross, buffers=buffers, index=index)
        tokens = torch.randint(4, config.vocab_size, (rows,), device=dev)
        weights = decoding.fused_weights(model)
        reference = None
        for name in args.variants.split(","):
            fn, flags = variant(name)
            settings = {"coordinate_descent_tuning": "cd" in flags}
            with inductor_config.patch(settings), torch.no_grad():
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)
                start = time.perf_counter()
                for _ in range(2):
                    logits = compiled(model, tokens, cache, mask, weights)
                first = time.perf_counter() - start
                if cuda:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        logits = compiled(model, tokens, cache, mask, weights)
                    graph.replay()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        graph.replay()
                    torch.cuda.synchronize()
                else:
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        logits = compiled(model, tokens, cache, mask, weights)
                us = 1e6 * (time.perf_counter() - start) / args.steps
                out = logits.float().clone()
                reference = out if reference is None else reference
                diff = float((out - reference).abs().max())
                same = bool((out.argmax(-1) == reference.argmax(-1)).all())
                print(f"rows={rows:<3} {name:<18} first {first:6.1f} s  {us:8.1f} us/step  max|dlogit| {diff:.3g}"
                      f"  same argmax {same}", flush=True)
                if args.profile and cuda:
                    profile(compiled, (model, tokens, cache, mask, weights))


def profile(fn, args, calls: int = 3):
    """The kernels of `calls` un-graphed calls, grouped by name: count per step and GPU microseconds per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    with run_profiler(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    groups: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        key = event.name[:60]
        g = groups.setdefault(key, [0, 0.0])
        g[0] += 1
        g[1] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    total_n = sum(g[0] for g in groups.values()) / calls
    total_us = sum(g[1] for g in groups.values()) / calls
    print(f"    kernels per step {total_n:.0f}, their GPU time {total_us:.0f} us")
    for key, (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"    {n / calls:5.0f} x {us / n:7.2f} us  {us / calls:8.1f} us  {key}")


if __name__ == "__main__":
    main()
