"""Reply latency of the packaged default model on the CPU, ours against transformers on the same weights.

    python benchmarks/benchmark_default_model.py                 # one thread, 20-token greedy replies
    python benchmarks/benchmark_default_model.py --threads 2 --repeats 40

Times a whole reply (tokenized prompt in, ids out: encoder and 20 decoder steps) with greedy search forced to
exactly `--new-tokens` tokens, and one reply with the model's own generation settings (beam search), for
our PyTorch backend and transformers' PyTorch `generate` loaded from the same folder, alternating, in this
process. Prints the median and the ratio ours / theirs (below 1 is faster). The package's target: a 20-token
greedy reply in <= 250 ms on the 2-core development CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

PROMPTS = ["Hello, how are you?", "What do you do for a living?", "Do you like music?",
           "What are you doing this weekend?"]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch

    from blenderbot_mb import BlenderbotTokenizer
    from blenderbot_mb.default_model import default_model_path
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    torch.set_num_threads(args.threads)
    folder = default_model_path()
    tokenizer = BlenderbotTokenizer.from_pretrained(folder)
    models = {"ours": BlenderbotForConditionalGeneration.from_pretrained(folder).float().eval()}
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        models["transformers"] = transformers.BlenderbotForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32).eval()
    except ImportError:
        print("transformers is not installed: timing ours only")
    forced = dict(num_beams=1, do_sample=False, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens,
                  no_repeat_ngram_size=0, repetition_penalty=1.0)
    inputs = [torch.tensor([tokenizer(p)["input_ids"]]) for p in PROMPTS]
    results: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm up, check the greedy replies agree
            replies = [model.generate(ids, **forced)[0].tolist() for ids in inputs]
            print(f"{name}: {tokenizer.decode(replies[0], skip_special_tokens=True)!r}")
        for _ in range(2):  # alternate: each model runs twice, in turn
            for name, model in models.items():
                for workload, settings in (("greedy", forced), ("default settings", {})):
                    def run(model=model, settings=settings):
                        for ids in inputs:
                            model.generate(ids, **settings)
                    per_reply = [t / len(inputs) for t in timed(run, max(1, args.repeats // 2))]
                    results.setdefault((workload, name), []).extend(per_reply)
    print(f"threads={args.threads} new_tokens={args.new_tokens} (ms per reply, median over "
          f"{args.repeats} x {len(PROMPTS)} prompts)")
    for workload in ("greedy", "default settings"):
        ours = statistics.median(results[(workload, "ours")])
        line = f"{workload:>17}: ours {ours:7.1f}"
        if (workload, "transformers") in results:
            theirs = statistics.median(results[(workload, "transformers")])
            line += f"  transformers {theirs:7.1f}  ours/theirs {ours / theirs:.2f}"
        print(line)


if __name__ == "__main__":
    main()
