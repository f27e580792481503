#!/usr/bin/env bash
# Every GPU measurement of training in one job on a machine with two GPUs (under 10 minutes): the NCCL
# equivalence (DDP, FSDP2), the CUDA tests of the graphed update, tokens/s of ours (the whole update as one
# CUDA graph, of the eager or the compiled layers; the eager update) and transformers' on 1 and 2 GPUs, the
# default model's size
# through the whole `train` loop on 2 and 1 GPUs, the Flax backend's equivalence and throughput on 1 and 2
# GPUs, and, with the time left, transformers' own step compiled (torch.compile of the whole model). From the
# repository root:
#
#     bash benchmarks/gpu_train_job.sh [PART...]     # all parts, or the named ones
#
# Only when named: ddp-breakdown-1gpu and ddp-breakdown-2gpu (benchmarks/ddp_breakdown.py: where our update's
# time goes on 1 GPU and under DDP on 2, per process: placement, nvidia-smi, NCCL bandwidth, phases,
# variants);
# throughput-64-1gpu and throughput-64-2gpu (the same at 64 rows per GPU; BENCH_PROFILE=1 adds each update's
# kernel timeline).
#
# Each part runs under its own time limit, cut to what is left of DEADLINE seconds (default 560) for the whole
# job; a part that fails or runs out of time is reported with the end of its log, and the next part runs.
# Prints each part's JSON lines prefixed with the part's name; full logs go to LOGS (default $OUT/train-job,
# else /tmp/train-job).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
logs=${LOGS:-${OUT:-/tmp}/train-job}
mkdir -p "$logs"
py=${PYTHON:-python3}
torchrun="$py -m torch.distributed.run --standalone --nproc-per-node"
recipe=/tmp/train-job-recipe  # synthetic conversations and run folders (checkpoints: not with the logs)
deadline=${DEADLINE:-560}
parts="equivalence cuda-tests throughput-1gpu throughput-2gpu recipe-2gpu recipe-1gpu flax-equivalence flax-throughput-1gpu
flax-throughput-2gpu"
wanted=" $(echo ${*:-$parts throughput-hf-compile}) "

part_results() {  # the JSON lines
    grep -h '^{' "$1"
}
source benchmarks/job_parts.sh

$py -c 'import torch, transformers; print("[setup] torch", torch.__version__, "transformers",
transformers.__version__, "gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
bench="benchmarks/benchmark_train.py"
part equivalence 100 $py $bench equivalence
part cuda-tests 100 $py -m pytest -q -p no:cacheprovider tests/test_torch_cuda.py -k "graphed"
both="ours-graphs,ours-graphs-compile,transformers"
part throughput-1gpu 170 $torchrun 1 $bench throughput --impl $both,ours
part throughput-2gpu 190 $torchrun 2 $bench throughput --impl $both,ours
wide="--impl ours-graphs-compile,transformers --batch-size 64"
part throughput-64-1gpu 170 $torchrun 1 $bench throughput $wide
part throughput-64-2gpu 190 $torchrun 2 $bench throughput $wide
part recipe-2gpu 90 $torchrun 2 $bench recipe $recipe --impl ours,ours-workers,ours-compile-workers --steps 30
part recipe-1gpu 80 $torchrun 1 $bench recipe $recipe --impl ours,ours-workers,ours-compile-workers --steps 30
part ddp-breakdown-1gpu 70 $torchrun 1 benchmarks/ddp_breakdown.py
NCCL_DEBUG=INFO part ddp-breakdown-2gpu 180 $torchrun 2 benchmarks/ddp_breakdown.py
[[ $wanted == *" ddp-breakdown-2gpu "* ]] && grep -m 4 -E " via |NCCL version" "$logs/ddp-breakdown-2gpu.log" | cut -c1-200 |
    sed "s/^/[ddp-breakdown-2gpu] nccl: /"
flax="$py benchmarks/benchmark_train_flax.py"
part flax-equivalence 90 $flax equivalence --worker-timeout 50
part flax-throughput-1gpu 120 $flax throughput --devices 1 --batch-size 32 --warmup 2 --steps 5
part flax-throughput-2gpu 140 $flax throughput --devices 2 --batch-size 32 --warmup 2 --steps 5
part throughput-hf-compile 150 $torchrun 1 $bench throughput --impl transformers,transformers-compile
echo "[job] $SECONDS s; the targets:"
$py $bench summary "$logs"
