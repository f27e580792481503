"""Check the ONNX export at the published shapes: random weights, float32, small inputs.

    python benchmarks/check_onnx_shapes.py --shapes blenderbot-400M-distill
    python benchmarks/check_onnx_shapes.py --shapes blenderbot-1B-distill,blenderbot-3B --timeout 900

Each shape runs in a child process: a randomly initialised PyTorch model is exported with the exporter of
`convert --to onnx` (`export_onnx`) into a temporary folder under --workdir, the graphs' logits (encoder and
decoder on a padded batch, then two steps of the decoder with past) are compared with the PyTorch backend's,
and so are the greedy and beam-4 replies (n-gram blocking 3 on both sides) of
ORTBlenderbotForConditionalGeneration (onnxruntime + the core search) and the PyTorch backend's `generate`.

Prints a table row per shape, then one line per shape `check_onnx_shapes <shape>: ok|FAIL|TIMEOUT|SKIP ...`.
Exit status: 0 every shape passed, 1 one failed or ran past --timeout, 3 one was skipped (not enough free
disk for it) and none failed. Needs, for float32 weights of W bytes (1.5 GB for 400M-distill, 5.7 GB for
1B-distill, 10.8 GB for 3B): about 3 W of free disk under --workdir (a shape is skipped up front without
it) and 4.5 W of memory (a warning where MemAvailable reads less). The temporary folder goes away in
every case, SIGTERM (`timeout`) included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from benchmark_generate import make_config

from blenderbot_mb.naming import tensor_specs

TOLERANCE = 1e-4
MEMORY_PER_WEIGHT_BYTE, DISK_PER_WEIGHT_BYTE = 4.5, 3.0


def weight_bytes(config) -> int:
    return 4 * sum(int(np.prod(spec.shape)) for spec in tensor_specs(config))


def memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check(shape: str, folder: str, device: str, new_tokens: int) -> dict:
    """The child's work; every stage prints its time, so that a run cut short still tells how far it got."""
    import resource

    import onnxruntime
    import torch

    from blenderbot_mb import GenerationConfig
    from blenderbot_mb.export.onnx import SUBFOLDER, export_onnx, past_names
    from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    start = time.perf_counter()

    def stage(what):
        print(f"[{shape}] {what} at {time.perf_counter() - start:.0f} s", flush=True)

    config = make_config(shape).replace(architectures=["BlenderbotForConditionalGeneration"])
    torch.manual_seed(0)
    model = BlenderbotForConditionalGeneration(config).eval()
    stage("model initialised")
    # the graphs that `convert --to onnx` writes, but for the merged decoder (the two decoders behind an `If`,
    # which the runtime does not load; tests/test_export_onnx.py checks it): it would add a third of the time
    export_onnx(model, os.path.join(folder, SUBFOLDER), merged=False)
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    exported = time.perf_counter() - start
    stage("exported")
    model.to(device)
    cuda = device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    ort = ORTBlenderbotForConditionalGeneration.from_pretrained(folder, providers=providers)
    stage(f"onnxruntime sessions on {providers[0]}")
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, (2, 16))
    ids[:, -1] = config.eos_token_id
    mask = np.ones_like(ids)
    ids[1, 9], ids[1, 10:], mask[1, 10:] = config.eos_token_id, config.pad_token_id, 0
    dec = rng.integers(4, config.vocab_size, (2, 8))
    dec[:, 0] = config.decoder_start_token_id
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                    decoder_input_ids=torch.from_numpy(dec).to(device)).logits.float().cpu().numpy()
    states = ort.encode(ids, mask)
    out = ort.decoder.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, :6],
                                 "encoder_hidden_states": states})
    diff = float(np.abs(out[0] - ref[:, :6]).max())
    past = dict(zip(past_names(config.decoder_layers), out[1:], strict=True))
    for t in (6, 7):
        step = ort.decoder_with_past.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, t:t + 1],
                                                **past})
        diff = max(diff, float(np.abs(step[0][:, 0] - ref[:, t]).max()))
        past.update(zip(past_names(config.decoder_layers, cross=False), step[1:], strict=True))
    stage(f"logits compared (max difference {diff:.2e}, largest |logit| {np.abs(ref).max():.2f})")
    same = {}
    for beams in (1, 4):
        settings = dict(num_beams=beams, max_length=1 + new_tokens, min_length=0, no_repeat_ngram_size=3,
                        encoder_no_repeat_ngram_size=3)
        with torch.no_grad():
            want = model.generate(input_ids=torch.from_numpy(ids).to(device),
                                  attention_mask=torch.from_numpy(mask).to(device), **settings).cpu().numpy()
        got = ort.generate(ids, mask, **settings)
        same[beams] = got.shape == want.shape and bool((got == want).all())
        stage(f"{'greedy' if beams == 1 else f'beam {beams}'} replies {'equal' if same[beams] else 'DIFFER'}")
    return {"export_s": exported, "diff": diff, "greedy": same[1], "beam": same[4],
            "ok": diff <= TOLERANCE and all(same.values()), "seconds": time.perf_counter() - start,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_shape(shape: str, args) -> str:
    """One shape in a child process, in a temporary folder that is removed whatever happens. Returns the
    summary status: ok, FAIL, TIMEOUT or SKIP."""
    need = weight_bytes(make_config(shape))
    disk, memory = shutil.disk_usage(args.workdir).free, memory_available()
    if disk < DISK_PER_WEIGHT_BYTE * need:
        print(f"check_onnx_shapes {shape}: SKIP needs ~{DISK_PER_WEIGHT_BYTE * need / 1e9:.0f} GB of free disk in "
              f"{args.workdir}, {disk / 1e9:.0f} GB free", flush=True)
        return "SKIP"
    if memory is not None and memory < MEMORY_PER_WEIGHT_BYTE * need:  # a warning: some VMs grow memory on use
        print(f"[{shape}] warning: needs ~{MEMORY_PER_WEIGHT_BYTE * need / 1e9:.0f} GB of memory, MemAvailable "
              f"reads {memory / 1e9:.0f} GB", flush=True)
    folder = tempfile.mkdtemp(dir=args.workdir, prefix="check-onnx-shapes-")
    command = [sys.executable, __file__, "--child", shape, "--folder", folder, "--device", args.device,
               "--new-tokens", str(args.new_tokens)]
    child = subprocess.Popen(command)
    try:
        child.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"check_onnx_shapes {shape}: TIMEOUT after {args.timeout} s", flush=True)
        return "TIMEOUT"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        result_file = os.path.join(folder, "result.json")
        result = json.load(open(result_file)) if os.path.isfile(result_file) else None
        shutil.rmtree(folder, ignore_errors=True)
    if result is None:
        killed = " (killed: out of memory?)" if child.returncode == -signal.SIGKILL else ""
        print(f"check_onnx_shapes {shape}: FAIL the check stopped with exit status {child.returncode}{killed}",
              flush=True)
        return "FAIL"
    status = "ok" if result["ok"] else "FAIL"
    print(f"| {shape} | {result['export_s']:.0f} s | {result['seconds']:.0f} s | {result['peak_rss'] / 1e9:.1f} GB "
          f"| {result['diff']:.2e} | {result['greedy']} | {result['beam']} | {status} |", flush=True)
    print(f"check_onnx_shapes {shape}: {status} max logit difference {result['diff']:.2e} (tolerance {TOLERANCE}), "
          f"greedy replies {'equal' if result['greedy'] else 'DIFFER'}, beam-4 replies "
          f"{'equal' if result['beam'] else 'DIFFER'}", flush=True)
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="blenderbot-400M-distill,blenderbot-1B-distill,blenderbot-3B")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the PyTorch reference runs; onnxruntime uses CUDA only where its build has it")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each shape")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the exports are written")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = check(args.child, args.folder, args.device, args.new_tokens)
        with open(os.path.join(args.folder, "result.json"), "w") as f:
            json.dump(result, f)
        return
    # `timeout` sends SIGTERM: leave through the `finally` that kills the child and removes its folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    print("| shape | export | total | peak RSS | max logit diff | greedy tokens equal | beam 4 tokens equal | |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    statuses = [run_shape(shape, args) for shape in args.shapes.split(",")]
    sys.exit(1 if {"FAIL", "TIMEOUT"} & set(statuses) else 3 if "SKIP" in statuses else 0)


if __name__ == "__main__":
    main()
