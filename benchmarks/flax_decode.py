"""Our jitted Flax generate() alone on a GPU, under the XLA flags of this process: ms per decoding step for a
few workloads at a published shape (random weights, 40-token contexts, exactly --new-tokens tokens), so
flag sets can be compared run against run (a baseline run beside each, in the same job and GPU).

    python benchmarks/flax_decode.py --workloads greedy-b1,beam10-b1,greedy-b32
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python benchmarks/flax_decode.py --label no-command-buffers
    python benchmarks/flax_decode.py --gpu-rows 1 --label "one row, not padded"
    python benchmarks/flax_decode.py --workloads beam10-b1 --ngram 3 --top-k-part 0 --label "whole-row top-k"
    python benchmarks/flax_decode.py --options "default:" "lt:xla_gpu_enable_cublaslt=true"
    python benchmarks/flax_decode.py --workloads beam10-b1 --options "table:" "reorder:BEAM_TABLE=false"
    python benchmarks/flax_decode.py --buckets 1,32 --workloads greedy-b1,beam10-b1
    python benchmarks/flax_decode.py --reorder-cost --workloads beam10-b1

--options compares XLA option sets in one process (generate()'s search compiled with each through
`blenderbot_mb.flax.generation.COMPILER_OPTIONS`, the sets' calls alternating, round by round): each set is
"label:name=value,name=value" ("label:" for the default options); an upper-case name is a switch of
`blenderbot_mb.flax.generation` instead (e.g. "reorder:BEAM_TABLE=false"), set while the set compiles and
runs. --buckets compares encoder buckets the same way (`blenderbot_mb.search.ENCODER_BUCKET`; 1: inputs
unpadded), each with every option set. --reorder-cost also times beam search's reorder of the whole
self-attention cache alone (`generation.reorder_cache` on the cache of the workload's rows and length, 60
times in one jitted loop), us a step.

Workloads: greedy-bN (N inputs) or beamK-bN, e.g. greedy-b1, greedy-b4, beam10-b1.

Prints one line per workload: label, ms/step (best of --repeats), tokens/s.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from benchmark_generate import WORKLOADS, make_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="blenderbot-400M-distill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workloads", default="greedy-b1")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ngram", type=int, default=0)
    p.add_argument("--gpu-rows", type=int, help="pad searches of fewer decoder rows to this many on GPUs "
                   "(blenderbot_mb.flax.generation.GPU_ROWS; 1: none)")
    p.add_argument("--top-k-part", type=int, help="long top-k in parts of this many values on GPUs "
                   "(blenderbot_mb.flax.generation.TOP_K_PART; 0: lax.top_k of the whole row)")
    p.add_argument("--label", default=os.environ.get("XLA_FLAGS", "") or "default flags")
    p.add_argument("--options", nargs="+", help='XLA option sets for the search alone, "label:name=value,..."')
    p.add_argument("--buckets", help="encoder buckets to compare, e.g. 1,32 (search.ENCODER_BUCKET; 1: none)")
    p.add_argument("--speed-table-settings", action="store_true",
                   help="speed_table.py's settings (length_penalty 1, early_stopping off, no forced eos), not the "
                        "model's generation defaults")
    p.add_argument("--reorder-cost", action="store_true", help="also time beam search's cache reorder alone")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from blenderbot_mb import search
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, generation

    if args.gpu_rows:
        generation.GPU_ROWS = args.gpu_rows
    if args.top_k_part is not None:
        generation.TOP_K_PART = args.top_k_part or 2**40

    config = make_config(args.shape)
    dtype = getattr(jnp, args.dtype)
    model = FlaxBlenderbotForConditionalGeneration(config, dtype=dtype)
    model.params = jax.tree_util.tree_map(lambda t: t.astype(dtype), model.params)
    rng = np.random.default_rng(0)
    defaults = {name: getattr(generation, name) for spec in args.options or () for name in _options(spec)[1]
                if name.isupper()}

    def use(options: dict, bucket: int) -> None:
        """An option set's XLA options and generation switches (the rest at their defaults), and a bucket."""
        for name, value in {**defaults, **options}.items():
            if name.isupper():
                setattr(generation, name, value)
        generation.COMPILER_OPTIONS = {k: v for k, v in options.items() if not k.isupper()}
        search.ENCODER_BUCKET = bucket

    option_sets = [_options(spec) for spec in args.options or ()] or [(args.label, {})]
    if args.buckets:  # (label, options, bucket) for each pair
        variants = [(f"{label}, bucket {b}" if len(option_sets) > 1 else f"bucket {b}", options, int(b))
                    for b in args.buckets.split(",") for label, options in option_sets]
    else:
        variants = [(label, options, search.ENCODER_BUCKET) for label, options in option_sets]
    for name in args.workloads.split(","):
        batch, beams = WORKLOADS.get(name) or _parse(name)
        ids = rng.integers(4, config.vocab_size, (batch, args.context)).astype(np.int32)
        mask = np.ones_like(ids)
        settings = dict(num_beams=beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        no_repeat_ngram_size=args.ngram, encoder_no_repeat_ngram_size=args.ngram)
        if args.speed_table_settings:
            settings.update(length_penalty=1.0, early_stopping=False, forced_eos_token_id=None, do_sample=False)
        best, first = {}, {}
        if args.reorder_cost and beams > 1:
            reorder_cost(model, batch * beams, settings["max_new_tokens"] + 1)
        for label, options, bucket in variants:
            use(options, bucket)
            try:
                out = model.generate(ids, attention_mask=mask, **settings).sequences
                first[label] = np.asarray(out)
                best[label] = float("inf")
            except Exception as e:  # an option this XLA does not know: say so, go on with the others
                print(f"{label} | {name} | failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        for _ in range(args.repeats):
            for label, options, bucket in variants:
                if label not in best:
                    continue
                use(options, bucket)
                start = time.perf_counter()
                model.generate(ids, attention_mask=mask, **settings).sequences.block_until_ready()
                best[label] = min(best[label], time.perf_counter() - start)
        base = next(iter(first.values()), None)
        for label, seconds in best.items():
            step = seconds / args.new_tokens
            same = "same tokens" if np.array_equal(first[label], base) else "OTHER TOKENS"
            print(f"{label} | {name} | {step * 1000:.3f} ms/step | {batch * args.new_tokens / seconds:,.0f} tokens/s "
                  f"| {seconds * 1000:.1f} ms/call | {same}", flush=True)


def reorder_cost(model, rows: int, length: int, steps: int = 60) -> None:
    """Beam search's reorder of the whole self-attention cache (the search's `reorder_cache`, the way without
    tables), `steps` times in one jitted loop: us a step."""
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax.generation import reorder_cache

    cache = model.init_cache(rows, length)
    parents = jnp.asarray(np.random.default_rng(0).integers(0, rows, (steps, rows)), jnp.int32)

    @jax.jit
    def loop(cache):
        def body(i, cache):
            return reorder_cache(cache, parents[i])
        return jax.lax.fori_loop(0, steps, body, cache)

    jax.block_until_ready(loop(cache))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        cache = jax.block_until_ready(loop(cache))
        best = min(best, time.perf_counter() - start)
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    print(f"reorder of the cache alone | {rows} rows, {length} positions, {size / 1e6:.1f} MB | "
          f"{best / steps * 1e6:.1f} us/step", flush=True)


def _options(spec: str) -> tuple[str, dict]:
    """("label", {xla option: value}) of "label:name=value,name=value"; values true/false/ints as such."""
    label, _, pairs = spec.partition(":")
    options = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        low = value.lower()
        options[key.strip().lstrip("-")] = (low == "true") if low in ("true", "false") else (
            int(value) if value.lstrip("-").isdigit() else value)
    return label, options


def _parse(name: str) -> tuple[int, int]:
    """(batch, beams) of greedy-bN or beamK-bN."""
    search, _, batch = name.rpartition("-b")
    beams = "1" if search == "greedy" else search.removeprefix("beam")
    if not (batch.isdigit() and beams.isdigit() and int(batch) > 0 and int(beams) > 0):
        raise SystemExit(f"unknown workload {name!r}: greedy-bN or beamK-bN (N inputs, K beams)")
    return int(batch), int(beams)


if __name__ == "__main__":
    main()
