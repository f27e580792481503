"""Time the Flax decode step written with Pallas kernels (generate(kernels=True)) against the module's step.

On one GPU (bf16, random weights of the published shapes; meant to take under 6 minutes on an H100, most of it
compiling; `--shape 400M-distill --rows 1` for a quick look):

    python benchmarks/flax_kernel_step.py
    python benchmarks/flax_kernel_step.py --sweep                 # also each kernel alone, several launches
    python benchmarks/flax_kernel_step.py --block-n 64 --linear-warps 8   # another launch for the step

On the CPU (Pallas' interpreter: checks the whole script end to end, its times mean nothing):

    python benchmarks/flax_kernel_step.py --shape tiny --device cpu --sweep

Parts, each printed as a table (a failing part prints its error and the run goes on):
  step       us per decoding step inside a jitted loop of --steps steps (cache of --cache positions, filled
             from position --start; --context encoder positions, the last rows padded), the module's
             `_decode_step` and the kernel step, their ratio, and the largest logit difference of one step
             (absolute, and relative to the largest logit).
  sweep      (--sweep) each kernel alone at the shape's real sizes over block sizes / warps, beside its
             jax.numpy twin under XLA, us per call inside a jitted loop (a one-element dependence between
             calls; the `loop` row is that loop's own cost).
  generate   whole generate() vs generate(kernels=True), 60 new tokens forced, greedy batch 1 (ms/step),
             beam 10 with n-gram blocking 3 (s/reply), greedy batch 32 (tokens/s), same tokens or not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from functools import partial

import numpy as np
from benchmark_generate import SHAPES, make_config

LAUNCH_FIELDS = ("block_n", "block_k", "linear_warps", "linear_stages", "head_block_n", "block_l",
                 "attention_warps", "attention_stages")


def shape_name(shape: str) -> str:
    return shape if shape in SHAPES or shape.startswith("blenderbot") else f"blenderbot-{shape}"


def part(title: str):
    """Run a part, printing its error (last lines of the traceback) instead of stopping the run."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {title}", flush=True)
            try:
                fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - report and go on to the next part
                print("FAILED:\n" + "".join(traceback.format_exc().splitlines(True)[-25:]), flush=True)
        return run
    return wrap


def random_model(config, dtype, seed=0):
    """A Flax model with random params in `dtype` (LayerNorm scales near 1), drawn on the device."""
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    model = FlaxBlenderbotForConditionalGeneration(config, dtype=dtype, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    params = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        noise = 0.02 * jax.random.normal(key, leaf.shape, jnp.float32)
        params.append((noise + (1.0 if "scale" in str(path[-1]) else 0.0)).astype(dtype))
    model.params = jax.tree_util.tree_unflatten(tree, params)
    return model


def timed(fn, *args, repeats=3, first=None):
    """Best seconds of `repeats` calls after one warm-up call (its seconds, compiling included, appended to
    the list `first` if given), blocking on the result."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if first is not None:
        first.append(time.perf_counter() - start)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------- the step
def step_setup(model, rows, args):
    """A cache filled with random keys/values up to --start, its index at --start, encoder states and mask."""
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax.generation import _cross_kv

    c, dtype = model.config, model.dtype
    cache = model.init_cache(rows, args.cache)
    key = jax.random.PRNGKey(1)

    def fill(path, x):
        if x.ndim == 0:
            return jnp.asarray(args.start, x.dtype)
        upto = jnp.arange(x.shape[2])[None, None, :, None] < args.start
        return jnp.where(upto, jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 2**31), x.shape), 0.0
                         ).astype(x.dtype)

    cache = jax.tree_util.tree_map_with_path(fill, cache)
    enc = jax.random.normal(jax.random.PRNGKey(2), (rows, args.context, c.d_model)).astype(dtype)
    lengths = args.context - (np.arange(rows) % 4) * 3  # some rows padded
    mask = jnp.asarray(np.arange(args.context)[None, :] < lengths[:, None], jnp.int32)
    cross = jax.jit(partial(_cross_kv, model))(model.params, enc, mask)
    token = jnp.asarray(np.random.default_rng(0).integers(4, c.vocab_size, rows), jnp.int32)
    return cache, cross, enc, mask, token


def step_loops(model, launch, steps):
    """Jitted loops of `steps` greedy steps (the next token: the argmax), module step and kernel step."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from blenderbot_mb.flax import decoding
    from blenderbot_mb.flax.generation import _decode_step

    def loop(step):
        def run(weights, cache, cross, enc, mask, token, start):
            def body(i, carry):
                cache, token = carry
                logits, cache = step(weights, cache, cross, token, start + i + 1, enc, mask)
                return cache, jnp.argmax(logits, -1).astype(jnp.int32)
            return lax.fori_loop(0, steps, body, (cache, token))[1]
        return jax.jit(run)

    def module(params, cache, cross, token, cur_len, enc, mask):
        return _decode_step(model, params, cache, cross, token, cur_len, enc, mask)

    def kernels(weights, cache, cross, token, cur_len, enc, mask):
        return decoding.decode_step(model.config, weights, cache, cross, token, cur_len, mask, launch)

    return loop(module), loop(kernels), jax.jit(module), jax.jit(kernels)


@part("step: us per decoding step in a jitted loop (module _decode_step vs Pallas kernel step)")
def step_part(model, shape, args, launch):
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import decoding

    weights = jax.jit(partial(decoding.prepare_weights, config=model.config, dtype=model.dtype))(model.params)
    module_loop, kernel_loop, module_one, kernel_one = step_loops(model, launch, args.steps)
    print(f"{'shape':<24} {'rows':>4} {'module us':>10} {'kernels us':>11} {'ratio':>6} {'max |dlogit|':>13} "
          f"{'relative':>9} {'first s':>7} {'first s':>7}  (first call, compiling: module, kernels)")
    for rows in args.rows:
        cache, cross, enc, mask, token = step_setup(model, rows, args)
        start = jnp.int32(args.start)
        try:
            compile_s = []
            t_module = timed(module_loop, model.params, cache, cross, enc, mask, token, start,
                             first=compile_s) / args.steps
            want, _ = module_one(model.params, cache, cross, token, start + 1, enc, mask)
            t_kernel = timed(kernel_loop, weights, cache, cross, enc, mask, token, start,
                             first=compile_s) / args.steps
            got, _ = kernel_one(weights, cache, cross, token, start + 1, enc, mask)
        except Exception as e:  # noqa: BLE001
            print(f"{shape:<24} {rows:>4} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        diff = float(jnp.max(jnp.abs(got - want)))
        print(f"{shape:<24} {rows:>4} {1e6 * t_module:>10.1f} {1e6 * t_kernel:>11.1f} {t_kernel / t_module:>6.2f} "
              f"{diff:>13.4g} {diff / float(jnp.max(jnp.abs(want))):>9.2g} {compile_s[0]:>7.1f} {compile_s[1]:>7.1f}",
              flush=True)


# ---------------------------------------------------------------------- each kernel alone
def kernel_cases(config, rows, dtype, args):
    """(name, kernel(launch) -> fn(x), twin fn(x), x) at the real sizes of one decoder layer and the head."""
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import kernels as K

    d, f, v, h = config.d_model, config.decoder_ffn_dim, config.vocab_size, config.decoder_attention_heads
    hd = d // h
    key = iter(jax.random.split(jax.random.PRNGKey(3), 32))

    def rand(*shape, scale=1.0):
        return (scale * jax.random.normal(next(key), shape)).astype(dtype)

    norm = (1.0 + rand(d, scale=0.1).astype(jnp.float32), rand(d, scale=0.1).astype(jnp.float32), 1e-5)
    cases = []
    for name, k_dim, n_dim, extra in (("qkv (norm)", d, 3 * d, dict(norm=norm)),
                                      ("out (+residual)", d, d, dict(residual=rand(rows, d))),
                                      ("fc1 (norm, gelu)", d, f, dict(norm=norm, activation="gelu")),
                                      ("fc2 (+residual)", f, d, dict(residual=rand(rows, d))),
                                      ("head (norm, [V,d])", d, v, dict(norm=norm, transposed=True,
                                                                        out_dtype=jnp.float32))):
        w = rand(n_dim, k_dim, scale=0.02) if extra.get("transposed") else rand(k_dim, n_dim, scale=0.02)
        b = rand(n_dim, scale=0.02)
        cases.append((name, lambda launch, w=w, b=b, e=extra: (lambda x: K.linear(x, w, b, **e, **launch)),
                      lambda x, w=w, b=b, e=extra: K.linear_reference(x, w, b, **e), rand(rows, k_dim), "linear"))
    for name, length, valid in (("self-attention", args.cache, jnp.int32(args.start)),
                                ("cross-attention", args.context, jnp.ones((rows, args.context), jnp.int32))):
        kk, vv = rand(rows, h, length, hd), rand(rows, h, length, hd)
        cases.append((name, lambda launch, k=kk, v=vv, m=valid: (lambda q: K.decode_attention(q, k, v, valid=m,
                                                                                             **launch)),
                      lambda q, k=kk, v=vv, m=valid: K.decode_attention_reference(q, k, v, valid=m),
                      rand(rows, h, hd), "attention"))
    return cases


def per_call(fn, x, reps):
    """us per call of fn inside a jitted loop; each call's input depends on the previous output."""
    import jax
    from jax import lax

    def body(_, x):
        y = fn(x)
        return x + (y.reshape(-1)[0] * 0).astype(x.dtype)

    loop = jax.jit(lambda x: lax.fori_loop(0, reps, body, x))
    return 1e6 * timed(loop, x) / reps


SWEEP = {"linear": [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
                    ((16, 256, 2), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 64, 4),
                     (128, 128, 8))],
         "attention": [dict(block_l=b, num_warps=w) for b, w in ((32, 1), (64, 2), (64, 4), (128, 4))]}


@part("sweep: us per call of each kernel alone (XLA twin beside it)")
def sweep_part(model, shape, args):
    print(f"{'shape':<24} {'rows':>4} {'kernel':<20} {'launch':<40} {'us':>9}")
    for rows in args.rows:
        loop_us = per_call(lambda x: x, np.zeros((rows, 8), np.float32), args.reps)
        print(f"{shape:<24} {rows:>4} {'loop':<20} {'(identity)':<40} {loop_us:>9.1f}", flush=True)
        for name, make, twin, x, kind in kernel_cases(model.config, rows, model.dtype, args):
            print(f"{shape:<24} {rows:>4} {name:<20} {'XLA twin':<40} {per_call(twin, x, args.reps):>9.1f}",
                  flush=True)
            for launch in SWEEP[kind]:
                label = " ".join(f"{k}={v}" for k, v in launch.items())
                try:
                    us = f"{per_call(make(launch), x, args.reps):>9.1f}"
                except Exception as e:  # noqa: BLE001
                    us = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"{shape:<24} {rows:>4} {name:<20} {label:<40} {us}", flush=True)


# ---------------------------------------------------------------------- whole generate
GENERATE = {"greedy-b1": (1, 1, 0), "beam10-ngram3-b1": (1, 10, 3), "greedy-b32": (32, 1, 0)}


@part("generate: whole generate() vs generate(kernels=True), new tokens forced")
def generate_part(model, shape, args, launch):
    c = model.config
    rng = np.random.default_rng(0)
    print(f"{'shape':<24} {'workload':<18} {'module':>12} {'kernels':>12} {'ratio':>6} {'unit':<10} same tokens")
    for name in args.workloads:
        batch, beams, ngram = GENERATE[name]
        ids = rng.integers(4, c.vocab_size, (batch, args.context))
        ids[:, -1] = c.eos_token_id
        mask = np.ones_like(ids)
        settings = dict(num_beams=beams, max_length=1 + args.new_tokens, min_length=1 + args.new_tokens,
                        do_sample=False, no_repeat_ngram_size=ngram, encoder_no_repeat_ngram_size=ngram,
                        length_penalty=1.0, early_stopping=False, forced_eos_token_id=None)
        outs, secs = {}, {}
        for label, extra in (("module", {}), ("kernels", dict(kernels=launch))):
            def run(ids=ids, mask=mask, settings=settings, extra=extra):
                return np.asarray(model.generate(ids, attention_mask=mask, **settings, **extra).sequences)
            try:
                outs[label] = run()
                secs[label] = timed(run, repeats=args.repeats)
            except Exception as e:  # noqa: BLE001
                print(f"{shape:<24} {name:<18} {label} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if len(secs) < 2:
            continue
        if beams > 1:
            unit, value = "s/reply", {k: s / batch for k, s in secs.items()}
        elif batch > 1:
            unit, value = "tokens/s", {k: batch * args.new_tokens / s for k, s in secs.items()}
        else:
            unit, value = "ms/step", {k: 1000 * s / args.new_tokens for k, s in secs.items()}
        same = np.array_equal(outs["module"], outs["kernels"])
        print(f"{shape:<24} {name:<18} {value['module']:>12.4g} {value['kernels']:>12.4g} "
              f"{secs['kernels'] / secs['module']:>6.2f} {unit:<10} {same}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--shape", default="400M-distill,3B", help="comma-separated: tiny or presets (400M-distill, 3B)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rows", default="1,10,32", help="rows per step (batch x beams)")
    p.add_argument("--cache", type=int, default=128, help="decoder cache positions")
    p.add_argument("--start", type=int, default=40, help="cache positions already filled when the steps start")
    p.add_argument("--context", type=int, default=40, help="encoder positions")
    p.add_argument("--steps", type=int, default=64, help="steps per timed loop")
    p.add_argument("--reps", type=int, default=200, help="calls per timed loop of --sweep")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best kept)")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--workloads", default=",".join(GENERATE), help=f"comma-separated from {', '.join(GENERATE)}")
    p.add_argument("--generate-shapes", default="400M-distill", help="shapes of the generate part ('' for none)")
    p.add_argument("--sweep", action="store_true", help="also time each kernel alone over launches")
    p.add_argument("--no-step", action="store_true", help="skip the step part")
    for name in LAUNCH_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="decoding.Launch field for the step")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import decoding

    if args.device == "gpu" and jax.default_backend() != "gpu":
        sys.exit(f"jax runs on {jax.default_backend()}, not a GPU (pass --device cpu for the interpreter)")
    args.rows = [int(r) for r in args.rows.split(",")]
    args.workloads = args.workloads.split(",")
    launch = decoding.Launch(**{k: getattr(args, k) for k in LAUNCH_FIELDS if getattr(args, k) is not None})
    print(f"jax {jax.__version__}, devices {jax.devices()}, dtype {args.dtype}, {launch}")
    dtype = getattr(jnp, args.dtype)
    generate_shapes = [shape_name(s) for s in args.generate_shapes.split(",") if s]
    began = time.perf_counter()
    for shape in (shape_name(s) for s in args.shape.split(",")):
        print(f"\n# {shape} ({time.perf_counter() - began:.0f} s into the run)", flush=True)
        model = random_model(make_config(shape), dtype)
        if not args.no_step:
            step_part(model, shape, args, launch)
        if args.sweep:
            sweep_part(model, shape, args)
        if shape in generate_shapes or args.shape == "tiny":
            generate_part(model, shape, args, launch)
        del model
    print(f"\ndone in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
