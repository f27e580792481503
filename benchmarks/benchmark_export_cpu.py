"""Time the exports on CPU beside the PyTorch backend, in one run, on the same random weights.

    python benchmarks/benchmark_export_cpu.py                                 # 400M shape, 60 new tokens
    python benchmarks/benchmark_export_cpu.py --shape tiny --new-tokens 10 --runtimes torch,ct2-int8

Runtimes: the PyTorch backend's generate (float32), the CTranslate2 export (float32 and int8 weights) and,
where the core search is present, the ONNX export on onnxruntime. Workloads: greedy and beam 10, batch 1,
a 40-token context, exactly `--new-tokens` tokens (min length = max length, n-gram blocking off, which
CTranslate2 cannot do on the encoder side). Prints ms per decoding step, best of --repeats with the
runtimes alternating, and whether the tokens equal the PyTorch backend's (for int8 they need not).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from benchmark_generate import make_config

WORKLOADS = {"greedy-b1": 1, "beam10-b1": 10}
RUNTIMES = ("torch", "ct2-float32", "ct2-int8", "onnx")


def runners(config, names, threads: int, folder: str) -> dict:
    """{name: generate(input_ids, attention_mask, settings) -> list of id lists} for the runtimes asked."""
    import torch

    from blenderbot_mb.export import export_model
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BlenderbotForConditionalGeneration(config).eval()
    src = os.path.join(folder, "model")
    model.save_pretrained(src)
    out = {}
    if "torch" in names:
        def run_torch(ids, mask, settings):
            with torch.no_grad():
                seqs = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      **settings)
            return seqs.tolist()

        out["torch"] = run_torch
    variants = [n.split("-", 1)[1] for n in names if n.startswith("ct2-")]
    if variants:
        from blenderbot_mb.export.ctranslate2 import CTranslate2Blenderbot

        export_model(src, os.path.join(folder, "ct2"), to="ctranslate2", quantization=tuple(variants))
        for v in variants:
            bot = CTranslate2Blenderbot.from_pretrained(os.path.join(folder, "ct2"), variant=v,
                                                        intra_threads=threads)
            out[f"ct2-{v}"] = lambda ids, mask, settings, bot=bot: bot.generate(ids, mask, **settings)
    if "onnx" in names:
        import onnxruntime

        from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration

        export_model(src, os.path.join(folder, "onnx"), to="onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        ort_model = ORTBlenderbotForConditionalGeneration.from_pretrained(os.path.join(folder, "onnx"),
                                                                          session_options=options)
        out["onnx"] = lambda ids, mask, settings: ort_model.generate(ids, mask, **settings).tolist()
    return {n: out[n] for n in names}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill", help="tiny or a preset name")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: the runtimes' defaults")
    p.add_argument("--runtimes", default="torch,ct2-float32,ct2-int8", help=f"comma-separated from {RUNTIMES}")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    args = p.parse_args(argv)
    config = make_config(args.shape)
    names = args.runtimes.split(",")
    with tempfile.TemporaryDirectory() as folder:
        run = runners(config, names, args.threads, folder)
        rng = np.random.default_rng(0)
        print(f"shape={args.shape} float32 context={args.context} new_tokens={args.new_tokens} "
              f"threads={args.threads or 'default'} cpus={os.cpu_count()}")
        print("| workload | " + " | ".join(f"{n} ms/step" for n in names) + " | same tokens as torch |")
        print("|---" * (len(names) + 2) + "|")
        for workload in args.workloads.split(","):
            ids = rng.integers(4, config.vocab_size, (1, args.context)).astype(np.int64)
            ids[:, -1] = config.eos_token_id
            mask = np.ones_like(ids)
            length = 1 + args.new_tokens
            settings = dict(num_beams=WORKLOADS[workload], max_length=length, min_length=length,
                            no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, forced_eos_token_id=None,
                            length_penalty=1.0)
            outputs = {n: fn(ids, mask, settings) for n, fn in run.items()}  # warm-up
            times = {n: [] for n in names}
            for _ in range(args.repeats):
                for n, fn in run.items():
                    start = time.perf_counter()
                    fn(ids, mask, settings)
                    times[n].append(time.perf_counter() - start)
            ms = {n: 1000 * min(t) / args.new_tokens for n, t in times.items()}
            ref = outputs.get("torch")
            same = ", ".join(f"{n}: {outputs[n][0] == ref[0]}" for n in names if n != "torch") if ref else "-"
            print(f"| {workload} | " + " | ".join(f"{ms[n]:.1f}" for n in names) + f" | {same} |")


if __name__ == "__main__":
    main()
