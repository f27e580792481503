"""Training speed and memory of the PyTorch backend, beside transformers' own PyTorch training step.

    # tokens/s on 1 and 2 GPUs: ours (TorchEngine: DDP, AdamW, clipping) and transformers', same shape
    torchrun --nproc-per-node 1 benchmarks/benchmark_train.py throughput --shape blenderbot-400M-distill
    torchrun --nproc-per-node 2 benchmarks/benchmark_train.py throughput --shape blenderbot-400M-distill
    # peak GPU memory of a 3B-shaped fine-tuning step: FSDP2 on 2 GPUs, gradient checkpointing, batch 8 x 128
    torchrun --nproc-per-node 2 benchmarks/benchmark_train.py memory --shape blenderbot-3B --batch-size 8
    # the same update with NCCL on 2 processes as on 1 (DDP and FSDP2, fp32, <= 1e-5)
    python benchmarks/benchmark_train.py equivalence

Throughput: random weights of the shape, bf16 autocast with fp32 master weights, every row 128 source and
128 target tokens, `--batch-size` rows per GPU; after `--warmup` updates, `--steps` updates are timed. Tokens
are source + target tokens of all GPUs; the step includes the optimizer (AdamW, clipping at 1.0) and, on
2 GPUs, the gradient all-reduce. transformers' step is `model(**batch).loss.backward()` + the same clipping
and AdamW under the same autocast (DistributedDataParallel on 2 GPUs). Both run in this process, one after
the other. Prints one JSON line per measurement (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from blenderbot_mb import BlenderbotConfig, GenerationConfig
from blenderbot_mb.training import TrainingOptions


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

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def throughput(args, config) -> None:
    import torch
    import transformers

    engine = our_engine(config, precision="bf16", batch_size=args.batch_size, lr=1e-5)
    rank, world = engine.rank, engine.world_size
    batch = synthetic_batch(config, args.batch_size, args.length, seed=rank)
    tokens = 2 * args.length * args.batch_size * world  # source + target, all GPUs
    step_count = [0]

    def ours():
        engine.train_step([batch], lr=1e-5, step=step_count[0], global_tokens=args.length * args.batch_size * world)
        step_count[0] += 1

    ours_s = timed(ours, args.warmup, args.steps)
    memory_ours = torch.cuda.max_memory_allocated() / 2**30
    engine = None  # free our model and optimizer before building theirs
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    device = torch.device("cuda", torch.cuda.current_device())
    hf_config = transformers.BlenderbotConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.BlenderbotForConditionalGeneration(hf_config).to(device).train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tensors = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

    def theirs():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = wrapped(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    theirs_s = timed(theirs, args.warmup, args.steps)
    if rank == 0:
        for name, seconds, memory in (("blenderbot-mb", ours_s, memory_ours),
                                      ("transformers", theirs_s, torch.cuda.max_memory_allocated() / 2**30)):
            print(json.dumps({"impl": name, "shape": args.shape, "gpus": world, "batch_per_gpu": args.batch_size,
                              "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
                              "ms_per_step": seconds * 1e3, "peak_gib": round(memory, 2)}), flush=True)
        print(json.dumps({"ours_over_transformers": theirs_s / ours_s}), flush=True)


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


# ---------------------------------------------------------------------- NCCL equivalence
TINY = dict(vocab_size=600, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
            dropout=0.0, scale_embedding=True)


def equivalence_worker(folder: str, out: str, batch_size: int, fsdp: bool) -> None:
    import torch

    from blenderbot_mb.torch.training import train

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    train(data=os.path.join(folder, "d.jsonl"), out=out, config=os.path.join(folder, "config.json"),
          tokenizer=os.path.join(folder, "tokenizer"), max_steps=3,
          batch_size=batch_size, lr=1e-2, schedule="constant", weight_decay=0.01, fsdp=fsdp, progress=False, seed=1)


def equivalence(args) -> None:
    from safetensors.numpy import load_file

    folder = tempfile.mkdtemp(prefix="train-equivalence-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    rng = np.random.default_rng(0)
    words = ["cats", "dogs", "music", "the sea", "pizza", "books", "rain", "a piano"]
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        for _ in range(16):
            a, b = rng.choice(words, 2)
            f.write(json.dumps({"context": f"Do you like {a}?", "reply": f"I like {b} more than {a}."}) + "\n")
    from blenderbot_mb.data import TrainingData
    from blenderbot_mb.tokenizer import train_tokenizer

    train_tokenizer(TrainingData(os.path.join(folder, "d.jsonl")).texts(), vocab_size=300).save_pretrained(
        os.path.join(folder, "tokenizer"))
    me = os.path.abspath(__file__)
    results = {}
    for fsdp in (False, True):
        one, two = os.path.join(folder, f"one-{fsdp}"), os.path.join(folder, f"two-{fsdp}")
        flag = ["--fsdp"] if fsdp else []
        subprocess.run([sys.executable, me, "equivalence-worker", folder, one, "--batch-size", "4", *flag], check=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", me,
                        "equivalence-worker", folder, two, "--batch-size", "2", *flag], check=True)
        a = load_file(os.path.join(one, "model", "model.safetensors"))
        b = load_file(os.path.join(two, "model", "model.safetensors"))
        # key biases have a zero true gradient (softmax ignores them): AdamW amplifies their rounding noise
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a if not k.endswith("k_proj.bias"))
        results["fsdp2" if fsdp else "ddp"] = diff
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    print(json.dumps({"backend": backend, "max_abs_diff_2_vs_1_process": results, "ok": max(results.values()) <= 1e-5}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["throughput", "memory", "equivalence", "equivalence-worker"])
    parser.add_argument("folder", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--shape", default="blenderbot-400M-distill")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    if args.mode == "equivalence":
        return equivalence(args)
    if args.mode == "equivalence-worker":
        return equivalence_worker(args.folder, args.out, args.batch_size, args.fsdp)
    config = BlenderbotConfig.from_preset(args.shape, dropout=0.0)
    (throughput if args.mode == "throughput" else memory)(args, config)


if __name__ == "__main__":
    main()
