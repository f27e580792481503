"""Time blenderbot-mb's generate() against Hugging Face transformers' on the same random weights.

    python benchmarks/benchmark_generate.py --shape tiny
    python benchmarks/benchmark_generate.py --shape 400M-distill --new-tokens 10 --workloads greedy-b1
    python benchmarks/benchmark_generate.py --shape 400M-distill --device cuda --dtype bfloat16
    python benchmarks/benchmark_generate.py --shape 400M-distill --device cuda --dtype bfloat16 --fused --compile

Workloads: greedy batch 1, beam 10 batch 1, greedy batch 8 (40-token contexts, exactly `--new-tokens`
tokens generated: min and max length are equal). Prints ms per decoding step for both, their ratio
(ours / theirs, below 1 is faster; best of --repeats, the two alternating) and whether the tokens agree. Both run in this process, one after
the other, on the same device and threads.

Backends register a runner in BACKENDS: `runner(config, args) -> (ours_generate, theirs_generate)`, where
each callable takes (input_ids, attention_mask, settings) as numpy arrays/dict and returns numpy ids.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from blenderbot_mb import BlenderbotConfig

SHAPES = {
    "tiny": dict(vocab_size=8008, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, scale_embedding=True),
}
WORKLOADS = {"greedy-b1": (1, 1), "beam10-b1": (1, 10), "greedy-b8": (8, 1), "greedy-b32": (32, 1),
             "greedy-b48": (48, 1), "greedy-b64": (64, 1)}  # (batch, beams)
DEFAULT_WORKLOADS = "greedy-b1,beam10-b1,greedy-b8"


def make_config(shape: str) -> BlenderbotConfig:
    if shape in SHAPES:
        return BlenderbotConfig.from_dict(SHAPES[shape])
    return BlenderbotConfig.from_preset(shape)


def torch_runner(config, args):
    import torch
    import transformers

    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ours = BlenderbotForConditionalGeneration(config).eval()
    hf_config = transformers.BlenderbotConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        theirs = transformers.BlenderbotForConditionalGeneration(hf_config)
    theirs.load_state_dict(ours.state_dict(), assign=True, strict=False)
    theirs.tie_weights()
    ours.to(device=args.device, dtype=dtype)
    theirs.to(device=args.device, dtype=dtype).eval()

    def wrap(model, **extra):
        def run(input_ids, attention_mask, settings):
            ids = torch.from_numpy(input_ids).to(args.device)
            mask = torch.from_numpy(attention_mask).to(args.device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, **settings, **extra)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out.cpu().numpy()
        return run

    return wrap(ours, fused=args.fused, compile=args.compile or False), wrap(theirs)


def flax_runner(config, args):
    """Our jitted Flax generate against transformers' PyTorch generate (the reference users run today;
    transformers 5 has no Flax classes) on the same weights, device and dtype."""
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.checkpoint_msgpack import params_from_tensors
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    _, theirs = torch_runner(config, args)
    import torch

    torch.manual_seed(0)  # the same weights torch_runner drew
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    state = {k: v.float().numpy() for k, v in BlenderbotForConditionalGeneration(config).state_dict().items()}
    from blenderbot_mb.naming import tensor_names

    tensors = {k: state[k] for k in tensor_names(config)}
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    params = jax.tree_util.tree_map(lambda t: jnp.asarray(t, dtype), params_from_tensors(tensors, config,
                                                                                        "BlenderbotForConditionalGeneration"))
    ours = FlaxBlenderbotForConditionalGeneration(config, dtype=dtype, _do_init=False, params=params)

    def run(input_ids, attention_mask, settings):
        out = ours.generate(input_ids, attention_mask=attention_mask, **settings)
        return np.asarray(out.sequences)

    return run, theirs


def _trim_padding(ids, fill, eos):
    """Drop trailing columns that are `fill` in every row (XLA keeps the static max_length width; eager
    generate, ours and the reference, stops at the longest reply). When the fill value is eos itself (beam
    search with pad 0), the first such column is the longest reply's closing eos and stays."""
    width = ids.shape[1]
    while width > 1 and (ids[:, width - 1] == fill).all():
        width -= 1
    if fill == eos and width < ids.shape[1]:
        width += 1
    return ids[:, :width]


def tf_runner(config, args):
    """Our XLA-compiled TensorFlow generate (`tf.function(model.generate, jit_compile=True)`, the fast path
    docs/tf.md describes) against transformers' PyTorch generate on the same weights, device and dtype.
    One compiled function per workload (settings are Python values, so each new workload traces once,
    in the warm-up)."""
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    _, theirs = torch_runner(config, args)
    import keras
    import torch

    from blenderbot_mb.naming import tensor_names
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    torch.manual_seed(0)  # the same weights torch_runner drew
    state = {k: v.float().numpy() for k, v in BlenderbotForConditionalGeneration(config).state_dict().items()}
    device = "/GPU:0" if args.device == "cuda" else "/CPU:0"
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.dtype)
    try:
        with tf.device(device):
            ours = TFBlenderbotForConditionalGeneration(config)
            ours.load_weights_dict({k: state[k] for k in tensor_names(config)})
    finally:
        keras.config.set_dtype_policy(policy)
    del state
    xla_generate = tf.function(ours.generate, jit_compile=True)

    def run(input_ids, attention_mask, settings):
        with tf.device(device):
            out = xla_generate(tf.constant(input_ids), attention_mask=tf.constant(attention_mask), **settings)
        ids = out.numpy().astype(np.int64)
        s = ours.generation_config.resolve(config, **settings)
        eos = s.eos_token_id
        fill = ((s.pad_token_id or eos) if eos is not None else -1) if s.num_beams > 1 else (s.pad_token_id or 0)
        return _trim_padding(ids, fill, eos)

    return run, theirs


BACKENDS = {"torch": torch_runner, "flax": flax_runner, "tf": tf_runner}


def time_pair(ours, theirs, repeats: int, *args):
    """Best-of-`repeats` seconds for each, alternating the two so that load from other processes hits both."""
    out_ours, out_theirs = ours(*args), theirs(*args)  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return min(t_ours), min(t_theirs), out_ours, out_theirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    p.add_argument("--shape", default="tiny", help="tiny or a preset: blenderbot-400M-distill (or 400M-distill), ...")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--context", type=int, default=40, help="encoder tokens per input")
    p.add_argument("--ngram", type=int, default=0, help="no_repeat_ngram_size and encoder_no_repeat_ngram_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated from {', '.join(WORKLOADS)}")
    p.add_argument("--fused", action="store_true", help="torch: our decoder step written for decoding")
    p.add_argument("--compile", nargs="?", const=True, default=None, metavar="MODE",
                   help="torch: our decoder step compiled with torch.compile (optionally a mode, e.g. "
                        "max-autotune-no-cudagraphs); the warm-up call compiles")
    args = p.parse_args(argv)
    shape = args.shape if args.shape in SHAPES or args.shape.startswith("blenderbot") else f"blenderbot-{args.shape}"
    config = make_config(shape)
    ours, theirs = BACKENDS[args.backend](config, args)
    rng = np.random.default_rng(0)
    print(f"backend={args.backend} shape={shape} device={args.device} dtype={args.dtype} "
          f"context={args.context} new_tokens={args.new_tokens} ngram={args.ngram}")
    print(f"{'workload':<12} {'ours ms/step':>13} {'theirs ms/step':>15} {'ours/theirs':>12} {'same tokens':>12}")
    for name in args.workloads.split(","):
        batch, beams = WORKLOADS[name]
        ids = rng.integers(4, config.vocab_size, (batch, args.context)).astype(np.int64)
        ids[:, -1] = config.eos_token_id
        mask = np.ones_like(ids)
        length = 1 + args.new_tokens
        settings = dict(num_beams=beams, max_length=length, min_length=length, do_sample=False,
                        no_repeat_ngram_size=args.ngram, encoder_no_repeat_ngram_size=args.ngram,
                        length_penalty=1.0, early_stopping=False)
        t_ours, t_theirs, out_ours, out_theirs = time_pair(ours, theirs, args.repeats, ids, mask, settings)
        same = out_ours.shape == out_theirs.shape and bool((out_ours == out_theirs).all())
        ms = lambda t: 1000 * t / args.new_tokens  # noqa: E731
        print(f"{name:<12} {ms(t_ours):>13.2f} {ms(t_theirs):>15.2f} {t_ours / t_theirs:>12.2f} {str(same):>12}")


if __name__ == "__main__":
    main()
