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
benchmark_train.py; run both on the same machine to compare. `--devices 1` and `--devices 2` in separate
processes give each its own time limit; compiled programs are kept in JAX's persistent compilation cache
(`JAX_COMPILATION_CACHE_DIR`, default a folder in the temporary directory), so a second run on the same machine
skips most of the compile time.

Equivalence checks numerics, not speed: a small model (d_model 64, 2+2 layers) so that the six compilations
(one device, two devices, two devices sharded, and each of two processes) take seconds. Two processes through
`jax.distributed` get a time limit of their own (`--worker-timeout`), and JAX does not preallocate GPU memory
(the parent process holds both GPUs while its two children each take one). Progress goes to stderr with the
seconds since start, so a run cut short by a time limit shows where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

EQUIVALENCE_SHAPE = dict(vocab_size=600, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_position_embeddings=128, dropout=0.0)
START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def compilation_cache() -> None:
    import tempfile

    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "jax-cache")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def synthetic_batch(config, rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, (rows, length)).astype(np.int32)
    ids[:, -1] = config.eos_token_id
    labels = rng.integers(4, config.vocab_size, (rows, length)).astype(np.int32)
    labels[:, -1] = config.eos_token_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def new_model(shape: str | dict, dtype, **overrides):
    import jax

    from blenderbot_mb import BlenderbotConfig
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    if isinstance(shape, dict):
        config = BlenderbotConfig.from_dict(shape)
    else:  # a preset name or a config.json (a CPU dry run)
        config = BlenderbotConfig.from_json_file(shape) if shape.endswith(".json") else BlenderbotConfig.from_preset(shape)
    model = FlaxBlenderbotForConditionalGeneration(config.replace(**overrides), seed=0, dtype=dtype)
    model.params = jax.tree_util.tree_map(np.asarray, model.params)  # host copy: each trainer places its own
    return model


def throughput(args) -> None:
    import jax
    import jax.numpy as jnp

    from blenderbot_mb.flax import training

    compilation_cache()
    progress(f"jax {jax.__version__}, {jax.device_count()} devices: {jax.devices()[0].device_kind}")
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = new_model(args.shape, dtype, dropout=0.0)
    progress(f"model {args.shape} made")
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
        progress(f"{n} devices: trainer made, compiling the update")
        for step in range(args.warmup):
            trainer.update([batch], lr=1e-5, seed=step)
            progress(f"{n} devices: warmup update {step + 1} of {args.warmup} done")
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
    progress(f"process {args.process_id}: jax.distributed.initialize")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                               process_id=args.process_id, initialization_timeout=args.worker_timeout)
    import jax.numpy as jnp

    progress(f"process {args.process_id}: {jax.device_count()} devices, one update")
    model = new_model(EQUIVALENCE_SHAPE, jnp.float32)
    batch = synthetic_batch(model.config, 8, 64, seed=1)
    params = one_update(model, jax.devices(), batch, fsdp=True)
    if jax.process_index() == 0:
        np.savez(args.out, **params)
    progress(f"process {args.process_id}: done")


def equivalence(args) -> None:
    import jax
    import jax.numpy as jnp

    progress(f"jax {jax.__version__}, {jax.device_count()} devices: {jax.devices()[0].device_kind}")
    model = new_model(EQUIVALENCE_SHAPE, jnp.float32)
    batch = synthetic_batch(model.config, 8, 64, seed=1)
    start = model.state_dict()
    single = one_update(model, jax.devices()[:1], batch, fsdp=False)
    progress("one device: done")
    results = {"update_size": max_diff(single, start)}
    if jax.device_count() >= 2:
        results["one_process_2_devices"] = max_diff(one_update(model, jax.devices()[:2], batch, fsdp=False), single)
        progress("one process, two devices: done")
        results["one_process_2_devices_fsdp"] = max_diff(one_update(model, jax.devices()[:2], batch, fsdp=True),
                                                         single)
        progress("one process, two devices, sharded: done")
        results["two_processes_fsdp"] = two_processes(single, args.worker_timeout)
    diffs = [v for k, v in results.items() if k != "update_size" and isinstance(v, float)]
    print(json.dumps({"backend": "flax", "device": jax.devices()[0].device_kind, "max_abs_diff_vs_1_device": results,
                      "ok": len(diffs) == len(results) - 1 and max(diffs) <= 1e-5}), flush=True)


def two_processes(single: dict, timeout: float) -> float | str:
    """The sharded update on 2 processes of one GPU each (jax.distributed on localhost) against `single`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, port = os.path.join(tmp, "params.npz"), 12000 + os.getpid() % 20000
        progress("two processes: starting")
        procs = [subprocess.Popen([sys.executable, __file__, "equivalence-worker", "--process-id", str(i),
                                   "--port", str(port), "--out", out, "--worker-timeout", str(timeout)],
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))) for i in range(2)]
        deadline = time.perf_counter() + timeout
        try:
            codes = [p.wait(timeout=max(deadline - time.perf_counter(), 1)) for p in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if codes is None:
            return f"timed out after {timeout} s"
        progress(f"two processes: exit codes {codes}")
        return max_diff(dict(np.load(out)), single) if codes == [0, 0] else f"failed {codes}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "equivalence", "equivalence-worker"])
    parser.add_argument("--shape", default="blenderbot-400M-distill", help="a preset name or a config.json")
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
    parser.add_argument("--worker-timeout", type=int, default=40, help="equivalence: seconds for the 2 processes")
    args = parser.parse_args()
    if args.what != "throughput":  # the parent holds both GPUs while each child takes one
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    {"throughput": throughput, "equivalence": equivalence, "equivalence-worker": equivalence_worker}[args.what](args)


if __name__ == "__main__":
    main()
