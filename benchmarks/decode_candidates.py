"""The PyTorch decoder step, each way generate() can run it, side by side in one process on one model:

    python benchmarks/decode_candidates.py --shape 400M-distill --device cuda --dtype bfloat16 \\
        --workloads greedy-b1,beam10-b1,greedy-b32 \\
        --candidates graph,graph-body,fused-compile,fused-compile-body
    python benchmarks/decode_candidates.py --shape 400M-distill --device cuda --dtype bfloat16 --ngram 3 \\
        --workloads beam10-b1 --candidates graph,graph-body,fused-compile,fused-compile-body
    python benchmarks/decode_candidates.py --shape tiny --new-tokens 8 --candidates eager,fused,fused-compile

Candidates (--candidates; on CUDA every one but `eager` replays a CUDA graph):
  eager                  the model's forward, no CUDA graph (cuda_graph=False)
  graph                  the model's forward step as a CUDA graph, the loop in Python (device_loop=False)
  fused                  the same with the step written for decoding (fused=True)
  compile                the same with torch.compile of the model's forward step (compile=True)
  fused-compile          the same with torch.compile of the fused step (fused=True, compile=True)
  kernels                the same with the fused step written with Triton kernels (kernels=True)
  kernels-rows           kernels=True with several rows' products by the several-row kernel (kernels.ROWS)
  kernels-compiled       kernels=True with several rows' step the fused step compiled around the attention
                         kernel (kernels.ROWS off)
  graph-body, fused-body, compile-body, fused-compile-body, kernels-body
                         each step above inside the whole loop body (step, processors, search bookkeeping,
                         cache reorder) replayed as one CUDA graph per token (device_loop=True, the default
                         of beam search on CUDA)
  ...:MODE               a torch.compile mode, e.g. fused-compile:max-autotune-no-cudagraphs

Random weights, 40-token contexts, exactly --new-tokens new tokens (min length = max length), n-gram blocking
of --ngram (decoder and encoder side; 0: none). Per workload: the first call of each candidate (compiling,
capturing: "first s"), then --repeats rounds, the candidates alternating, best of each; ms per step (beam
search: per step of the whole beam), generated tokens/s, the ratio to the first candidate, whether the timed
calls' tokens equal the first candidate's, the largest difference of the processed scores to it (from a call
with output_scores=True, which runs the step-only loop for -body candidates: it needs the host each step) and,
for beam search, of the timed calls' sequence scores. Each row is also printed as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from benchmark_generate import WORKLOADS, make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration, kernels

DEFAULT_ROWS = kernels.ROWS  # the package's; the kernels-rows / kernels-compiled candidates switch it


def candidate_settings(name: str) -> dict:
    kind, _, mode = name.partition(":")
    step, body = kind.removesuffix("-body"), kind.endswith("-body")
    settings = {"eager": dict(cuda_graph=False), "graph": {}, "fused": dict(fused=True),
                "compile": dict(compile=mode or True), "fused-compile": dict(fused=True, compile=mode or True),
                "kernels": dict(kernels=True, rows_kernel=DEFAULT_ROWS), "kernels-rows": dict(kernels=True, rows_kernel=True),
                "kernels-compiled": dict(kernels=True, rows_kernel=False)}
    if step not in settings or (mode and "compile" not in kind) or (body and step == "eager"):
        raise SystemExit(f"unknown candidate {name!r}")
    return settings[step] if step == "eager" else {**settings[step], "device_loop": body}


def run(model, ids, settings, device, scores=False):
    settings = dict(settings)
    if "rows_kernel" in settings:  # a module switch, not a generate() setting
        kernels.ROWS = settings.pop("rows_kernel")
    with torch.no_grad():
        out = model.generate(ids, return_dict_in_generate=True, output_scores=scores, **settings)
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="greedy-b1,beam10-b1,greedy-b32")
    p.add_argument("--candidates", default="graph,fused,compile,fused-compile")
    p.add_argument("--ngram", type=int, default=0, help="no_repeat_ngram_size, encoder_no_repeat_ngram_size")
    args = p.parse_args(argv)
    shape = args.shape if args.shape == "tiny" or args.shape.startswith("blenderbot") else f"blenderbot-{args.shape}"
    config = make_config(shape)
    candidates = args.candidates.split(",")
    torch.manual_seed(0)
    with torch.device(args.device):  # random weights drawn on the device: quick at the 3B shape too
        model = BlenderbotForConditionalGeneration(config).eval().to(getattr(torch, args.dtype))
    rng = np.random.default_rng(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# shape={shape} device={device_name} dtype={args.dtype} torch={torch.__version__} "
          f"context={args.context} new_tokens={args.new_tokens} ngram={args.ngram}")
    print(f"{'workload':<11} {'candidate':<44} {'first s':>8} {'ms/step':>8} {'tokens/s':>9} "
          f"{'vs ' + candidates[0]:>10} {'same':>5} {'max |dscore|':>12} {'|dseqscore|':>11}")
    for workload in args.workloads.split(","):
        batch, beams = WORKLOADS[workload]
        ids = rng.integers(4, config.vocab_size, (batch, args.context))
        ids[:, -1] = config.eos_token_id
        ids = torch.from_numpy(ids).to(args.device)
        length = 1 + args.new_tokens
        base = dict(num_beams=beams, max_length=length, min_length=length, do_sample=False,
                    no_repeat_ngram_size=args.ngram, encoder_no_repeat_ngram_size=args.ngram,
                    length_penalty=1.0, early_stopping=False)
        first, outputs = {}, {}
        for name in candidates:
            start = time.perf_counter()
            try:
                run(model, ids, {**base, **candidate_settings(name)}, args.device)  # compiles, captures
                first[name] = time.perf_counter() - start
                outputs[name] = run(model, ids, {**base, **candidate_settings(name)}, args.device, scores=True)
            except Exception as e:  # a candidate that fails is reported, the others still run
                print(f"{workload:<11} {name:<44} failed: {type(e).__name__}: {str(e)[:300]!r}")
                first.pop(name, None)
                continue
        if candidates[0] not in outputs:
            continue
        times, timed = {name: [] for name in outputs}, {}
        for _ in range(args.repeats):
            for name in outputs:
                start = time.perf_counter()
                timed[name] = run(model, ids, {**base, **candidate_settings(name)}, args.device)
                times[name].append(time.perf_counter() - start)
        ref, last = outputs[candidates[0]], timed[candidates[0]]
        for name in outputs:
            out, best = timed[name], min(times[name])
            same = out.sequences.shape == last.sequences.shape and bool(
                (out.sequences == last.sequences).all())
            delta = max(float((a.float() - b.float()).nan_to_num(0, 0, 0).abs().max())
                        for a, b in zip(outputs[name].scores, ref.scores, strict=True))
            seq_delta = float((out.sequences_scores - last.sequences_scores).abs().max()) \
                if out.sequences_scores is not None else float("nan")
            row = dict(workload=workload, candidate=name, shape=shape, dtype=args.dtype, device=device_name,
                       first_s=round(first[name], 2), ms_per_step=round(1000 * best / args.new_tokens, 4),
                       tokens_per_s=round(batch * args.new_tokens / best, 1),
                       ratio=round(best / min(times[candidates[0]]), 3), same_tokens=same,
                       max_score_diff=delta, sequence_score_diff=seq_delta, ngram=args.ngram)
            print(f"{workload:<11} {name:<44} {row['first_s']:>8.2f} {row['ms_per_step']:>8.3f} "
                  f"{row['tokens_per_s']:>9.0f} {row['ratio']:>10.2f} {str(same):>5} {delta:>12.3g} "
                  f"{seq_delta:>11.3g}")
            print(json.dumps(row))


if __name__ == "__main__":
    main()
