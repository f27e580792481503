#!/usr/bin/env bash
# Every GPU measurement of the PyTorch decoder step in one job on one GPU: the candidates of
# benchmarks/decode_candidates.py side by side (the CUDA-graph step, the fused step, each compiled with
# torch.compile) at the 400M-distill shape (greedy batch 1, beam 10, greedy batch 32), the same steps inside
# the whole loop body replayed as one CUDA graph per token (body-400M; body-ngram3-400M: beam 10 with n-gram
# blocking 3 on both sides), the 3B shape (greedy batch 1) in bfloat16, the GPU tests, then max-autotune with
# the time left (often none: run parts alone, `bash benchmarks/gpu_decode_job.sh body-400M body-ngram3-400M
# tests`, with DEADLINE=560 for those three). From the repository root:
#
#     bash benchmarks/gpu_decode_job.sh [PART...]      # all parts, or the named ones
#
# Each part runs under its own time limit, cut to what is left of DEADLINE seconds (default 420); a part
# that fails or runs out of time is reported with the end of its log, and the next part runs. Prints each
# part's table; full logs go to LOGS (default $OUT/decode-job, else /tmp/decode-job). SHAPE_400M, SHAPE_3B,
# NEW_TOKENS and REPEATS change the runs (`SHAPE_400M=tiny SHAPE_3B=tiny NEW_TOKENS=4` tries the job on a CPU
# with DEVICE=cpu DTYPE=float32).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
logs=${LOGS:-${OUT:-/tmp}/decode-job}
mkdir -p "$logs"
py=${PYTHON:-python3}
deadline=${DEADLINE:-420}
parts="decode-400M body-400M body-ngram3-400M tests decode-3B autotune-400M"
wanted=" ${*:-$parts} "

part_results() {  # the tables of decode_candidates.py and pytest's summary
    grep -v '^{' "$1" | grep -E '^(#|workload|greedy|beam|[0-9]+ (passed|failed)|FAILED|ERROR)'
}
source benchmarks/job_parts.sh

$py -c 'import torch, transformers; print("[setup] torch", torch.__version__, "transformers",
transformers.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
bench="$py benchmarks/decode_candidates.py --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16}"
bench="$bench --new-tokens ${NEW_TOKENS:-60} --repeats ${REPEATS:-3}"
part decode-400M 220 $bench --shape "${SHAPE_400M:-400M-distill}" --workloads greedy-b1,beam10-b1,greedy-b32 \
    --candidates graph,fused,compile,fused-compile
body="graph,graph-body,fused-compile,fused-compile-body"
part body-400M 240 $bench --shape "${SHAPE_400M:-400M-distill}" --workloads greedy-b1,beam10-b1,greedy-b32 \
    --candidates $body
part body-ngram3-400M 120 $bench --shape "${SHAPE_400M:-400M-distill}" --ngram 3 --workloads beam10-b1 \
    --candidates $body
part tests 200 $py -m pytest -q -p no:cacheprovider tests/test_torch_cuda.py
part decode-3B 100 $bench --shape "${SHAPE_3B:-3B}" --workloads greedy-b1 --candidates graph,fused,fused-compile
part autotune-400M 200 $bench --shape "${SHAPE_400M:-400M-distill}" --workloads greedy-b1,greedy-b32 \
    --candidates graph,fused-compile:max-autotune-no-cudagraphs
echo "[job] $SECONDS s; JSON rows in $logs/decode-*.log"
