"""The decoder step of several rows (`kernels.kernel_logits`) as groups of rows, each on a CUDA stream of its
own, run at once, beside the whole step in one chain of kernels; each captured as one CUDA graph and replayed
(one GPU):

    python benchmarks/stream_rows.py --rows 32,24 --group-rows 0,8,16

`--group-rows 0`: one chain (kernels.GROUPS off); N: groups of N rows (kernels.GROUP_ROWS; the package's is
16). `--serial`: each grouping also with its groups in turn on one stream (what the streams overlap). A step
of 32 rows runs each product as programs of 16 rows; its time (0.78 ms on an H200 against 0.40 for one row)
is mostly kernels waiting for the kernel before them, and a group's kernel can run while the other's waits.
The logits of each grouping are compared with the one chain's and with the float32 fused step without kernels
(each row's largest difference).
"""

from __future__ import annotations

import argparse

import torch
from benchmark_generate import make_config
from rows_step import replay_us

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, kernels
from blenderbot_mb.torch.decoding import fused_logits, fused_weights
from blenderbot_mb.torch.generation import _captured, beam_table
from blenderbot_mb.torch.modeling import KVCache


class _OneStream:
    """kernels' streams of groups, all the current one (--serial)."""

    def __init__(self, streams):
        self.streams = streams

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return torch.cuda.current_stream()


def make(model, rows: int, group_rows: int, serial: bool, buffers, cross, mask, tokens, index,
         fork_first: bool = False):
    """A captured step (kernels.GROUPS and GROUP_ROWS set while it captures), its logits buffer, and what the
    graph reads outside its own memory (kept alive with it)."""
    layers = len(model.get_decoder().layers)
    weights = fused_weights(model)
    cache = KVCache(layers, cross_kv=[(c[0], c[1]) for c in cross], buffers=buffers, index=index,
                    table=beam_table(rows, buffers.shape[4], "cuda"))
    kernels.GROUPS, kernels.GROUP_ROWS = group_rows > 0, group_rows or 16
    streams = kernels._STREAMS
    if serial:
        kernels._STREAMS = _OneStream(streams)
    out = {}
    side = torch.cuda.Stream()

    def step():
        if not fork_first:
            out["logits"] = kernels.kernel_logits(model, tokens, cache, mask, weights)
            return
        here = torch.cuda.current_stream()
        side.wait_stream(here)
        with torch.cuda.stream(side):
            out["logits"] = kernels.kernel_logits(model, tokens, cache, mask, weights)
        here.wait_stream(side)

    try:
        graph = _captured(step, torch.device("cuda"))
    finally:
        kernels._STREAMS = streams
        kernels.GROUPS, kernels.GROUP_ROWS = True, 16
    return graph, out, (cache, weights)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="32")
    p.add_argument("--group-rows", default="0,16")
    p.add_argument("--serial", action="store_true")
    p.add_argument("--fork-first", action="store_true",
                   help="each grouping also with the whole step on a stream forked from the capture's")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    config = make_config(args.shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BlenderbotForConditionalGeneration(config).eval().to(getattr(torch, args.dtype))
    with torch.device("cuda"):  # the float32 reference: the same weights, no kernels
        model32 = BlenderbotForConditionalGeneration(config).eval()
    model32.load_state_dict(model.state_dict())
    d, heads, layers = config.d_model, config.decoder_attention_heads, config.decoder_layers
    print(f"# {args.shape} {torch.cuda.get_device_name()} {args.dtype} torch {torch.__version__}", flush=True)
    limit = kernels.ROWS_M
    for rows in (int(r) for r in args.rows.split(",")):
        kernels.ROWS_M = max(limit, rows)  # (the package's limit applies to generate(), not to this comparison)
        g = torch.Generator(device="cuda").manual_seed(0)
        buffers = torch.randn(layers, 2, rows, heads, 128, d // heads, generator=g, device="cuda", dtype=model.dtype)
        cross = torch.randn(layers, 2, rows, heads, 64, d // heads, generator=g, device="cuda", dtype=model.dtype)
        mask = torch.zeros(rows, 64, dtype=torch.long, device="cuda")
        mask[:, :40] = 1
        tokens = torch.randint(4, config.vocab_size, (rows,), generator=g, device="cuda")
        index = torch.tensor([60], device="cuda")
        copied = KVCache(layers, cross_kv=[(c[0].float(), c[1].float()) for c in cross], buffers=buffers.float(),
                         index=index)
        with torch.no_grad():  # the fused step without kernels, float32
            reference = fused_logits(model32, tokens, copied, mask, fused_weights(model32)).float()
        del copied
        made = {}
        for group_rows in (int(x) for x in args.group_rows.split(",")):
            for serial in (False, True) if args.serial and group_rows else (False,):
                for fork_first in (False, True) if args.fork_first else (False,):
                    saved = buffers.clone()
                    name = (f"groups of {group_rows}{' in turn' if serial else ''}" if group_rows else "one chain") \
                        + (", forked" if fork_first else "")
                    made[name] = make(model, rows, group_rows, serial, buffers, cross, mask, tokens, index, fork_first)
                    buffers.copy_(saved)  # (the warm-ups wrote position 60)
        times = {k: [] for k in made}
        for _ in range(args.rounds):
            for k, (graph, *_) in made.items():
                times[k].append(replay_us(graph, 200))
        first = next(iter(made))
        made[first][0].replay()
        torch.cuda.synchronize()
        base = made[first][1]["logits"].clone()
        for k, (graph, out, _) in made.items():
            graph.replay()
            torch.cuda.synchronize()
            logits = out["logits"]
            per_row = (logits - reference).abs().amax(-1)
            print(f"{rows:3d} rows  {k:<24} {min(times[k]):8.1f} us a step  max |dlogit| vs {first} "
                  f"{(logits - base).abs().max().item():.3g}, vs float32 (each row's largest) "
                  f"{per_row.min().item():.3f}-{per_row.max().item():.3f}", flush=True)
    kernels.ROWS_M = limit


if __name__ == "__main__":
    main()
