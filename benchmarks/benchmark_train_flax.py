"""Training speed of the Flax backend on 1 and 2 GPUs, and the 2-GPU update checked against the 1-GPU one.

    # tokens/s of one process driving 1 GPU, then 2 GPUs (the batch split along the mesh's 'data' axis)
    python benchmarks/benchmark_train_flax.py throughput --shape blenderbot-400M-distill --batch-size 16
    # the same update on 2 GPUs (one process, and two processes through jax.distributed) as on 1 (fp32, <= 1e-5)
    python benchmarks/benchmark_train_flax.py equivalence

Throughput: random weights of the shape, bf16 compute over fp32 master weights (`--precision fp32` for full
fp32), every row 128 source and 128 target tokens, `--batch-size` rows per GPU; after `--warmup` updates,
`--steps` updates are timed. Tokens are source + target tokens of all GPUs; an update includes AdamW, clipping
at 1.0 and, on 2 GPUs, the gradient reduction XLA inserts. `--fsdp` also shards params and optimizer state.
Prints one JSON line per measurement. The PyTorch numbers (ours and transformers') come from
benchmark_train.py; run both on the same machine to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def synthetic_batch(config, rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, (rows, length)).astype(np.int32)
    ids[:, -1] = config.eos_token_id
    labels = rng.integers(4, config.vocab_size, (rows, length)).astype(np.int32)
    labels[:, -1] = config.eos_token_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def new_model(shape: str, dtype, **overrides):
    import jax

    from blenderbot_mb import BlenderbotConfig
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    config = BlenderbotConfig.from_preset(shape).replace(**overrides)
    model = FlaxBlenderbotForConditionalGeneration(config, seed=0, dtype=dtype)
    model.params = jax.tree_util.tree_map(np.asarray, model.params)  # host copy: each trainer places its own
    return model


def throughput(args) -> None:
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import training

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = new_model(args.shape, dtype, dropout=0.0)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    for n in args.devices:
        if n > jax.device_count():
            print(json.dumps({"devices": n, "skipped": f"only {jax.device_count()} devices"}), flush=True)
            continue
        mesh = training.data_parallel_mesh(jax.devices()[:n])
        trainer = training.Trainer(model, training.adamw(weight_decay=0.01, max_grad_norm=1.0), mesh=mesh,
                                   fsdp=args.fsdp)
        rows = args.batch_size * n
        batch = synthetic_batch(model.config, rows, args.length, seed=0)
        for step in range(args.warmup):
            trainer.update([batch], lr=1e-5, seed=step)
        jax.block_until_ready(trainer.state.params)
        start = time.perf_counter()
        for step in range(args.steps):
            metrics = trainer.update([batch], lr=1e-5, seed=step)  # float() of the loss waits for the step
        seconds = (time.perf_counter() - start) / args.steps
        tokens = 2 * rows * args.length
        print(json.dumps({"backend": "flax", "shape": args.shape, "devices": n, "device": jax.devices()[0].device_kind,
                          "precision": args.precision, "fsdp": args.fsdp, "rows_per_device": args.batch_size,
                          "length": args.length, "step_ms": round(seconds * 1e3, 2),
                          "tokens_per_s": round(tokens / seconds), "tokens_per_s_per_device": round(tokens / seconds / n),
                          "loss": round(metrics["loss"], 4)}), flush=True)
        del trainer


def one_update(model, devices, batch, fsdp: bool):
    import optax

    from blenderbot_mb.flax import training

    trainer = training.Trainer(model, training.frozen_logits_bias(optax.sgd(1.0)), fsdp=fsdp,
                               mesh=training.data_parallel_mesh(devices))
    rows = trainer.local_rows(len(batch["labels"]))
    trainer.update([{k: v[rows] for k, v in batch.items()}], lr=0.5, seed=0)
    return model.state_dict(trainer.model_params())


def max_diff(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def equivalence_worker(args) -> None:
    """One of 2 processes (one GPU each) after jax.distributed.initialize; process 0 saves the params."""
    import jax

    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):  # a dry run without GPUs
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                               process_id=args.process_id)
    import jax.numpy as jnp

    model = new_model(args.shape, jnp.float32, dropout=0.0, encoder_layers=2, decoder_layers=2)
    batch = synthetic_batch(model.config, 8, 64, seed=1)
    params = one_update(model, jax.devices(), batch, fsdp=True)
    if jax.process_index() == 0:
        np.savez(args.out, **params)


def equivalence(args) -> None:
    import tempfile

    import jax
    import jax.numpy as jnp

    model = new_model(args.shape, jnp.float32, dropout=0.0, encoder_layers=2, decoder_layers=2)
    batch = synthetic_batch(model.config, 8, 64, seed=1)
    start = model.state_dict()
    single = one_update(model, jax.devices()[:1], batch, fsdp=False)
    results = {"update_size": max_diff(single, start)}
    if jax.device_count() >= 2:
        results["one_process_2_devices"] = max_diff(one_update(model, jax.devices()[:2], batch, fsdp=False), single)
        results["one_process_2_devices_fsdp"] = max_diff(one_update(model, jax.devices()[:2], batch, fsdp=True),
                                                         single)
        with tempfile.TemporaryDirectory() as tmp:
            out, port = os.path.join(tmp, "params.npz"), 12000 + os.getpid() % 20000
            procs = [subprocess.Popen([sys.executable, __file__, "equivalence-worker", "--process-id", str(i),
                                       "--port", str(port), "--out", out, "--shape", args.shape],
                                      env=dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))) for i in range(2)]
            if all(p.wait() == 0 for p in procs):
                results["two_processes_fsdp"] = max_diff(dict(np.load(out)), single)
    diffs = [v for k, v in results.items() if k != "update_size"]
    print(json.dumps({"backend": "flax", "device": jax.devices()[0].device_kind, "max_abs_diff_vs_1_device": results,
                      "ok": bool(diffs) and max(diffs) <= 1e-5}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "equivalence", "equivalence-worker"])
    parser.add_argument("--shape", default="blenderbot-400M-distill")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per device")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=12355)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    {"throughput": throughput, "equivalence": equivalence, "equivalence-worker": equivalence_worker}[args.what](args)


if __name__ == "__main__":
    main()
