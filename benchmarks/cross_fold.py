"""The cross-attention of a decoder layer as three kernels (the q product with its norm, the attention kernel,
the out product with its residual) against two products with the query projection folded into the keys and
the out projection into the values (kernels.fold_cross): a chain of 12 layers in one CUDA graph, us a layer.
"two products" is the q and out products alone (no attention): what the folded form replaces 3 kernels by.

    python benchmarks/cross_fold.py --lengths 64 --rows 1,10 --heads 32    # the 400M shape: 32 heads of 40
"""

import argparse
import time

import torch

from blenderbot_mb.torch import kernels


def graphed_us(fn, replays: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / replays * 1e6)
    return best


def chains(layers, rows, length, heads, d, dtype):
    hd = d // heads
    new = lambda *shape, scale=0.02: torch.randn(*shape, device="cuda", dtype=dtype) * scale  # noqa: E731
    ws = [dict(wq=new(d, d), bq=new(d), wo=new(d, d), bo=new(d), ln=torch.nn.LayerNorm(d).to("cuda", dtype),
               k=new(rows, heads, length, hd, scale=1), v=new(rows, heads, length, hd, scale=1),
               m=new(heads * length, d), bm=new(heads * length), vo=new(d, heads * length)) for _ in range(layers)]
    mask = torch.ones(rows, length, dtype=torch.long, device="cuda")
    h0 = new(rows, d, scale=1)

    def three():
        h = h0
        for w in ws:
            q = kernels.linear(h, w["wq"], w["bq"], norm=w["ln"])
            out = kernels.attention(q, w["k"], w["v"], heads=heads, mask=mask)
            h = kernels.linear(out, w["wo"], w["bo"], residual=h)

    def folded(softmax: bool):
        def run():
            h = h0
            for w in ws:
                s = kernels.linear(h, w["m"], w["bm"], norm=w["ln"], out_dtype=torch.float32 if softmax else None)
                h = kernels.linear(s, w["vo"], w["bo"], residual=h, softmax=length if softmax else 0)
        return run

    def two():
        h = h0
        for w in ws:
            q = kernels.linear(h, w["wq"], w["bq"], norm=w["ln"])
            h = kernels.linear(q, w["wo"], w["bo"], residual=h)

    return {"three kernels": three, "two products, no softmax": folded(False), "two products, softmax": folded(True),
            "q and out products alone": two}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64")
    p.add_argument("--rows", default="1,10")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--d-model", type=int, default=1280)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, d_model {args.d_model}, {args.heads} heads, bf16, us a layer")
    for length in map(int, args.lengths.split(",")):
        for rows in map(int, args.rows.split(",")):
            ways = chains(args.layers, rows, length, args.heads, args.d_model, torch.bfloat16)
            best = {name: min(graphed_us(fn) for _ in range(3)) / args.layers for name, fn in ways.items()}
            print(f"length {length}, rows {rows}: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
