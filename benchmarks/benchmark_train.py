"""Training speed and memory of the PyTorch backend, beside transformers' own PyTorch training step.

    # tokens/s on 1 and 2 GPUs: ours (TorchEngine: DDP, AdamW, clipping), eager and compiled, and transformers'
    torchrun --nproc-per-node 1 benchmarks/benchmark_train.py throughput --impl ours,ours-compile,transformers
    torchrun --nproc-per-node 2 benchmarks/benchmark_train.py throughput --impl ours,ours-compile,transformers
    # the packaged default model's size through the whole `train` loop (data, tokenizer, loader, engine)
    torchrun --nproc-per-node 2 benchmarks/benchmark_train.py recipe --batch-size 64
    # peak GPU memory of a 3B-shaped fine-tuning step: FSDP2 on 2 GPUs, gradient checkpointing, batch 8 x 128
    torchrun --nproc-per-node 2 benchmarks/benchmark_train.py memory --shape blenderbot-3B --batch-size 8
    # the same update with NCCL on 2 processes as on 1 (DDP and FSDP2, fp32)
    python benchmarks/benchmark_train.py equivalence

Throughput: random weights of the shape (dropout 0), bf16 autocast with fp32 master weights, every row 128
source and 128 target tokens (no padding), `--batch-size` rows per GPU; after `--warmup` updates, `--steps`
updates are timed. The default warmup, 12, leaves out the updates in which DDP waits for the GPU: in its 2nd to
11th iteration (and every 100th) DDP's forward synchronizes on the previous iteration's CUDA events to log its
runtime statistics, which would time those updates without the host running ahead of the GPU. Tokens are source + target tokens of all GPUs. Ours is `TorchEngine.train_step` on numpy
batches (host checks and copies included): fused AdamW, clipping at 1.0, DDP on 2 GPUs; `ours-compile` adds
`compile=True` (every layer through torch.compile); `ours-compile-model` compiles the whole model instead
(`compile="model"`: one graph on 1 GPU; under DDP, graphs split at the gradient buckets by DDPOptimizer);
`ours-graphs` adds `cuda_graphs=True` (the whole update replayed as one CUDA graph, captured at the 12th
update on 2 GPUs, the 4th on one); `ours-graphs-compile` and `ours-graphs-compile-model` replay the graph of
the compiled layers or model. transformers' step is what its `Trainer` runs by default
on the same autocast: `model(**batch).loss.backward()` with SDPA attention, clipping at 1.0 and fused AdamW
(`adamw_torch_fused`), DistributedDataParallel on 2 GPUs, batches already on the GPU; `transformers-compile`
is the same with `torch.compile(model)` (Trainer's `torch_compile=True`). Each implementation runs in this
process after the previous one is freed. Prints one JSON line per measurement (rank 0).

Recipe: `train()` itself on `--conversations` synthetic conversations shaped like the default model's corpus
(about 34 turns of about 17 words; contexts reach the 128-token limit), the packaged tokenizer, the
`medium` candidate of `default_model_recipe`, bf16; tokens/s from metrics.jsonl after `--warmup` updates,
beside the loader alone (ms per global batch on one thread) and the engine alone on batches made beforehand.
`ours-workers` encodes batches on `--loader-workers` processes, `ours-compile` compiles the layers.

Equivalence: a tiny model trained 3 updates (AdamW, lr 1e-2) on 4 rows per update, fp32 with TF32 off, the
math attention kernel and deterministic algorithms. The 2-process runs (2 rows each) are compared with one
process accumulating two micro-batches of 2 rows, so every row goes through kernels of the same shapes:
- DDP: the one process adds the second micro-batch's gradient to the first's (a + b), the all-reduce of two
  processes computes the same a + b (float addition of two numbers does not depend on order): bound 1e-6,
  expected 0.
- FSDP2: its backward hooks change the order in which autograd sums the several gradients of one tensor (the
  encoder states feed every decoder layer, the embedding is tied), and the gradient norm is summed over shards:
  gradients agree to float32 rounding (about 1e-7 of their size), and AdamW, which divides each gradient by its
  own magnitude, turns that into differences of up to about 1e-3 x lr for the few weights whose gradient is
  near 0: bound 1e-5 at lr 1e-2.
Attention key biases are left out: their true gradient is 0 (softmax ignores them), so AdamW turns pure rounding
noise into full steps of lr. One process with 4-row micro-batches is reported beside it (`one_process_4_rows`):
other matrix shapes pick other kernels, with other rounding.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from blenderbot_mb import BlenderbotConfig, GenerationConfig
from blenderbot_mb.training import TrainingOptions

# our engine's options per implementation (recipe: also ours[-compile]-workers)
OURS = {"ours": {}, "ours-compile": {"compile": True}, "ours-graphs": {"cuda_graphs": True},
        "ours-graphs-compile": {"cuda_graphs": True, "compile": True},
        "ours-graphs-compile-model": {"cuda_graphs": True, "compile": "model"},
        "ours-compile-model": {"compile": "model"}}
IMPLS = (*OURS, "transformers", "transformers-compile")


def synthetic_batch(config, rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, (rows, length))
    ids[:, -1] = config.eos_token_id
    labels = rng.integers(4, config.vocab_size, (rows, length))
    labels[:, -1] = config.eos_token_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def our_engine(config, **options):
    """A TorchEngine on a new model of `config` (no data files: the benchmark feeds batches itself)."""
    from blenderbot_mb.torch.training import TorchEngine

    run = types.SimpleNamespace(options=TrainingOptions(data="-", out="-", **options), model_folder=None,
                                adapter_folder=None, config=config,
                                generation_config=GenerationConfig.from_model_config(config))
    return TorchEngine(run)


def timed(step, warmup: int, steps: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a dry run
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    if os.environ.get("BENCH_PROFILE") and torch.cuda.is_available():
        print(json.dumps(kernel_timeline(step)), flush=True)
    return seconds


def kernel_timeline(step, updates: int = 2) -> dict:
    """Where `updates` updates' GPU time goes (torch.profiler's kernel records, also inside CUDA graph
    replays): per update the wall from first kernel to last, the time some non-NCCL kernel runs, the time only
    NCCL kernels run (communication not hidden behind compute), NCCL kernels' own time, and idle time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(updates):
            step()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower()) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]

    def union(intervals) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    compute = union([(a, b) for a, b, nccl in kernels if not nccl])
    every = union([(a, b) for a, b, _ in kernels])
    wall = max(b for _, b, _ in kernels) - min(a for a, _, _ in kernels)
    ms = lambda us: round(us / 1e3 / updates, 2)  # noqa: E731 - microseconds over all updates -> ms per update
    return {"rank": int(os.environ.get("RANK", 0)), "kernels_per_update": len(kernels) // updates,
            "wall_ms": ms(wall), "compute_ms": ms(compute), "nccl_only_ms": ms(every - compute),
            "nccl_kernels_ms": ms(sum(b - a for a, b, nccl in kernels if nccl)), "idle_ms": ms(wall - every)}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def load_shape(shape: str):
    """A published shape (blenderbot_mb.presets) or a config.json, without dropout."""
    if shape.endswith(".json"):
        return BlenderbotConfig.from_json_file(shape).replace(dropout=0.0)
    return BlenderbotConfig.from_preset(shape, dropout=0.0)


def ours(args, config, batch, world: int, impl: str) -> float:
    engine = our_engine(config, precision="bf16", batch_size=args.batch_size, lr=1e-5, **OURS[impl])
    count = [0]

    def step():
        engine.train_step([batch], lr=1e-5, step=count[0], global_tokens=args.length * args.batch_size * world)
        count[0] += 1

    return timed(step, args.warmup, args.steps)


def transformers_step(args, config, batch, world: int, impl: str) -> float:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    fields = {k: v for k, v in config.to_dict().items() if k != "architectures"}
    hf_config = transformers.BlenderbotConfig(**fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BlenderbotForConditionalGeneration(hf_config).to(device).train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    wrapped = torch.compile(model) if impl == "transformers-compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda or None)
    tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = wrapped(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args.warmup, args.steps)


def throughput(args, config) -> None:

    from blenderbot_mb.torch.training import init_distributed

    _, rank, world, _ = init_distributed()
    batch = synthetic_batch(config, args.batch_size, args.length, seed=rank)
    tokens = 2 * args.length * args.batch_size * world  # source + target, all GPUs
    results = {}
    for impl in args.impl.split(","):
        free_memory()
        run = ours if impl.startswith("ours") else transformers_step
        try:
            seconds = run(args, config, batch, world, impl)
        except Exception as e:  # one failing variant must not hide the others' numbers
            if rank == 0:
                print(json.dumps({"impl": impl, "gpus": world, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            continue
        results[impl] = tokens / seconds
        if rank == 0:
            print(json.dumps({"impl": impl, "shape": args.shape, "gpus": world, "batch_per_gpu": args.batch_size,
                              "tokens_per_s": round(tokens / seconds), "per_gpu": round(tokens / seconds / world),
                              "ms_per_step": round(seconds * 1e3, 2), "peak_gib": peak_gib()}), flush=True)
    if rank == 0 and "transformers" in results:
        print(json.dumps({"gpus": world, "over_transformers": {k: round(v / results["transformers"], 3)
                                                                for k, v in results.items()}}), flush=True)


def memory(args, config) -> None:
    import torch

    engine = our_engine(config, precision="bf16", batch_size=args.batch_size, fsdp=True, gradient_checkpointing=True)
    batch = synthetic_batch(config, args.batch_size, args.length, seed=engine.rank)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: engine.train_step([batch], lr=1e-5, step=0, global_tokens=args.length * args.batch_size
                                              * engine.world_size), 1, args.steps)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if engine.rank == 0:
        print(json.dumps({"shape": args.shape, "fsdp2_gpus": engine.world_size, "gradient_checkpointing": True,
                          "batch_per_gpu": args.batch_size, "tokens": args.length, "peak_gib_per_gpu": float(peak),
                          "ms_per_step": seconds * 1e3}), flush=True)


# ---------------------------------------------------------------------- the default model's size, whole loop
def write_conversations(path: str, count: int, seed: int = 0) -> None:
    """Synthetic conversations shaped like the default model's corpus (turns per conversation about 34 on
    average, geometric; words per turn log-normal around 17), words drawn from the package's dialogues."""
    from blenderbot_mb.data import corpus_pairs

    words = sorted({w for pair in corpus_pairs() for text in pair for w in text.split()})
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            turns = [" ".join(rng.choice(words, max(1, int(rng.lognormal(2.6, 0.7)))))
                     for _ in range(max(2, int(rng.geometric(1 / 34))))]
            f.write(json.dumps({"turns": turns}) + "\n")


def recipe(args) -> None:
    import torch

    from blenderbot_mb import default_model
    from blenderbot_mb.default_model_recipe import CANDIDATES, COMMON
    from blenderbot_mb.torch.training import init_distributed, train
    from blenderbot_mb.trainer import prepare_run
    from blenderbot_mb.training import epoch_order

    _, rank, world, _ = init_distributed()
    folder = args.folder or tempfile.mkdtemp(prefix="train-recipe-")
    os.makedirs(folder, exist_ok=True)
    data, config = os.path.join(folder, "conversations.jsonl"), os.path.join(folder, "config.json")
    if rank == 0 and not os.path.isfile(data):
        write_conversations(data, args.conversations)
        BlenderbotConfig.from_dict(dict(COMMON, **CANDIDATES[args.candidate], vocab_size=8008)).save_pretrained(folder)
    if world > 1:
        torch.distributed.barrier()
    tokenizer = default_model.packaged_folder()
    options = dict(data=data, config=config, tokenizer=tokenizer, batch_size=args.batch_size, lr=1e-3,
                   precision="bf16", progress=False, seed=0, weight_decay=0.01, schedule="cosine", warmup=10)
    for impl in args.impl.split(","):
        out = os.path.join(folder, f"out-{impl}-{world}")
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        if world > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        try:
            train(out=out, max_steps=args.warmup + args.steps, compile="compile" in impl,
                  loader_workers=args.loader_workers if "workers" in impl else 0, **options)
        except Exception as e:  # one failing variant must not hide the others' numbers
            print(json.dumps({"impl": impl, "gpus": world, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            continue
        wall = time.perf_counter() - start
        if rank == 0:
            with open(os.path.join(out, "metrics.jsonl")) as f:
                lines = [r for r in map(json.loads, f) if "loss" in r and r["step"] >= args.warmup]
            steps, seconds = lines[-1]["step"] - lines[0]["step"], lines[-1]["time"] - lines[0]["time"]
            speed = float(np.mean([r["tokens_per_s"] for r in lines[1:]]))
            print(json.dumps({"recipe": args.candidate, "impl": impl, "gpus": world, "batch_per_gpu": args.batch_size,
                              "tokens_per_s": round(speed), "ms_per_step": round(seconds / steps * 1e3, 2),
                              "loss_first_last": [round(lines[0]["loss"], 3), round(lines[-1]["loss"], 3)],
                              "wall_s_with_startup": round(wall, 1)}), flush=True)
    if rank != 0:
        return
    # where the time goes: the loader alone (one global batch of this process), the engine alone
    run = prepare_run(data=data, out=os.path.join(folder, "probe"), config=config, tokenizer=tokenizer,
                      batch_size=args.batch_size)
    order = epoch_order(len(run.data), 0, 0)
    start = time.perf_counter()
    batches = [run.micro_batches(run.data, order[i * args.batch_size:(i + 1) * args.batch_size], 1, 1, 0)[0]
               for i in range(args.steps)]
    loader_ms = (time.perf_counter() - start) / args.steps * 1e3
    print(json.dumps({"recipe": args.candidate, "loader_ms_per_batch": round(loader_ms, 2), "rows": args.batch_size,
                      "shapes": [list(b["input_ids"].shape) + [b["labels"].shape[1]] for b in batches[:4]]}),
          flush=True)
    if world == 1:
        engine = our_engine(run.config, precision="bf16", batch_size=args.batch_size, lr=1e-4)
        count = [0]

        def step():
            b = batches[count[0] % len(batches)]
            engine.train_step([b], lr=1e-4, step=count[0], global_tokens=int((b["labels"] != -100).sum()))
            count[0] += 1

        seconds = timed(step, args.warmup, args.steps)
        print(json.dumps({"recipe": args.candidate, "engine_alone_ms_per_step": round(seconds * 1e3, 2)}), flush=True)


# ---------------------------------------------------------------------- NCCL equivalence
TINY = dict(vocab_size=600, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
            dropout=0.0, scale_embedding=True)


def equivalence_worker(folder: str, out: str, batch_size: int, grad_accum: int, fsdp: bool) -> None:
    import torch

    from blenderbot_mb.torch.training import train

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.use_deterministic_algorithms(True, warn_only=True)
    for backend in ("flash", "mem_efficient", "cudnn"):  # the math kernel: the same arithmetic at any batch size
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    train(data=os.path.join(folder, "d.jsonl"), out=out, config=os.path.join(folder, "config.json"),
          tokenizer=os.path.join(folder, "tokenizer"), max_steps=3, batch_size=batch_size, grad_accum=grad_accum,
          lr=1e-2, schedule="constant", weight_decay=0.01, fsdp=fsdp, progress=False, seed=1)


def equivalence(args) -> None:
    import torch
    from safetensors.numpy import load_file

    from blenderbot_mb.data import TrainingData
    from blenderbot_mb.tokenizer import train_tokenizer

    folder = tempfile.mkdtemp(prefix="train-equivalence-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    rng = np.random.default_rng(0)
    words = ["cats", "dogs", "music", "the sea", "pizza", "books", "rain", "a piano"]
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        for _ in range(16):
            a, b = rng.choice(words, 2)
            f.write(json.dumps({"context": f"Do you like {a}?", "reply": f"I like {b} more than {a}."}) + "\n")
    train_tokenizer(TrainingData(os.path.join(folder, "d.jsonl")).texts(), vocab_size=300).save_pretrained(
        os.path.join(folder, "tokenizer"))
    me = os.path.abspath(__file__)
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", OMP_NUM_THREADS="1")  # CPU: one thread everywhere

    def run(name, procs, batch_size, grad_accum=1, fsdp=False):
        out = os.path.join(folder, name)
        launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", str(procs)]
        subprocess.run([*launch, me, "equivalence-worker", folder, out, "--batch-size", str(batch_size),
                        "--grad-accum", str(grad_accum), *(["--fsdp"] if fsdp else [])], check=True, env=env)
        return load_file(os.path.join(out, "model", "model.safetensors"))

    def diff(a, b):  # key biases have a zero true gradient (softmax ignores them): AdamW amplifies their noise
        return max(float(np.abs(a[k] - b[k]).max()) for k in a if not k.endswith("k_proj.bias"))

    same_shapes = run("one-2x2", 1, batch_size=2, grad_accum=2)
    results, bounds = {}, {"ddp": 1e-6, "fsdp2": 1e-5}
    for mode in bounds:  # one failing mode must not hide the other's result
        try:
            results[mode] = diff(same_shapes, run(f"two-{mode}", 2, batch_size=2, fsdp=mode == "fsdp2"))
        except subprocess.CalledProcessError as e:
            results[mode] = f"failed ({e.returncode})"
    print(json.dumps({"backend": "nccl" if torch.cuda.is_available() else "gloo",
                      "max_abs_diff_2_vs_1_process": results, "bounds": bounds,
                      "ok": all(isinstance(results[k], float) and results[k] <= bounds[k] for k in bounds),
                      "one_process_4_rows": diff(same_shapes, run("one-4", 1, batch_size=4))}), flush=True)


def summary(folder: str) -> None:
    """The targets, from the JSON lines of gpu_train_job.sh's logs in `folder`."""
    def lines(name):
        path = os.path.join(folder, f"{name}.log")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    speed = {(r["impl"], r["gpus"]): r["tokens_per_s"] for part in ("throughput-1gpu", "throughput-2gpu")
             for r in lines(part) if "tokens_per_s" in r}
    out = {"scaling_1_to_2_gpus (>= 1.8)": {impl: round(speed[impl, 2] / speed[impl, 1], 3) for impl, gpus in speed
                                            if gpus == 1 and (impl, 2) in speed}}
    for gpus in (1, 2):
        if ("transformers", gpus) in speed:
            out[f"per_gpu_over_transformers_{gpus}gpu (>= 1.3)"] = {
                impl: round(v / speed["transformers", gpus], 3) for (impl, g), v in speed.items() if g == gpus}
    flax = {r["devices"]: r["tokens_per_s"] for part in ("flax-throughput-1gpu", "flax-throughput-2gpu")
            for r in lines(part) if "tokens_per_s" in r}
    if 1 in flax and 2 in flax:
        out["flax_scaling_1_to_2_gpus (>= 1.8)"] = round(flax[2] / flax[1], 3)
    one = {r["variant"]: r["ms_per_update"] for r in lines("ddp-breakdown-1gpu") if r.get("rank") == 0
           and "ms_per_update" in r}
    if "ddp" in one:  # scaling of every DDP variant against the engine on one GPU
        out["ddp_breakdown_scaling"] = {r["variant"]: round(2 * one["ddp"] / r["ms_per_update"], 3)
                                        for r in lines("ddp-breakdown-2gpu") if r.get("rank") == 0
                                        and "ms_per_update" in r}
    out["equivalence"] = [{k: r[k] for k in ("max_abs_diff_2_vs_1_process", "ok")} for r in lines("equivalence")]
    out["recipe_ms_per_step"] = {f"{r['impl']}, {r['gpus']} gpu": r["ms_per_step"] for part in ("recipe-1gpu", "recipe-2gpu")
                                 for r in lines(part) if "ms_per_step" in r}
    for key, value in out.items():
        print(f"{key}: {json.dumps(value)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["throughput", "recipe", "memory", "equivalence", "equivalence-worker",
                                         "summary"])
    parser.add_argument("folder", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--shape", default="blenderbot-400M-distill", help="a preset name or a config.json")
    parser.add_argument("--impl", default=None, help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per GPU (32; recipe: 64)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=12, help="updates before timing (DDP: past its 11th)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=3000, help="recipe: synthetic conversations")
    parser.add_argument("--candidate", default="medium", help="recipe: a size of default_model_recipe.CANDIDATES")
    parser.add_argument("--loader-workers", type=int, default=4, help="recipe: loader processes of *-workers")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    if args.mode == "equivalence":
        return equivalence(args)
    if args.mode == "summary":
        return summary(args.folder)
    if args.mode == "equivalence-worker":
        return equivalence_worker(args.folder, args.out, args.batch_size, args.grad_accum, args.fsdp)
    if args.mode == "recipe":
        args.batch_size, args.impl = args.batch_size or 64, args.impl or "ours,ours-compile"
        return recipe(args)
    args.batch_size, args.impl = args.batch_size or 32, args.impl or "ours,ours-compile,transformers"
    config = load_shape(args.shape)
    (throughput if args.mode == "throughput" else memory)(args, config)


if __name__ == "__main__":
    main()
