"""The folded cross-attention of generate(kernels=True) against the unfolded one (kernels.FOLD_POSITIONS 64 / 0)
in one process, alternating, best of 5 calls per round: ms per step of a 60-token greedy reply, 40-token input.

    python benchmarks/fold_check.py --shapes blenderbot-400M-distill,blenderbot-3B
"""

from __future__ import annotations

import argparse
import time

import torch
from benchmark_generate import make_config

from blenderbot_mb.torch import BlenderbotForConditionalGeneration
from blenderbot_mb.torch import kernels as K


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="blenderbot-400M-distill")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=40)
    args = p.parse_args(argv)
    for shape in args.shapes.split(","):
        config = make_config(shape)
        model = BlenderbotForConditionalGeneration(config).to("cuda", torch.bfloat16).eval()
        ids = torch.randint(4, config.vocab_size, (1, args.context), device="cuda")

        def call(model=model, ids=ids):
            out = model.generate(ids, max_new_tokens=60, min_new_tokens=60, no_repeat_ngram_size=0,
                                 encoder_no_repeat_ngram_size=0, kernels=True)
            torch.cuda.synchronize()
            return out

        best, tokens = {}, {}
        for _ in range(args.rounds):
            for fold in (64, 0):
                K.FOLD_POSITIONS = fold
                model.__dict__.pop("_cuda_graph_steps", None)
                tokens[fold] = call()  # captures
                for _ in range(5):
                    start = time.perf_counter()
                    call()
                    best[fold] = min(best.get(fold, 1e9), (time.perf_counter() - start) / 60 * 1000)
        same = torch.equal(tokens[64], tokens[0])
        print(f"{shape} {torch.cuda.get_device_name()}: folded {best[64]:.3f} ms/step, unfolded {best[0]:.3f} "
              f"ms/step, ratio {best[64] / best[0]:.3f}, same tokens {same}")
        del model, call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
