"""Decoding speed of every implementation installed, ours and the references, side by side in one run.

    python benchmarks/speed_table.py                                     # CPU: 400M-distill, float32 and int8
    python benchmarks/speed_table.py --shapes tiny --new-tokens 10       # a quick look
    python benchmarks/speed_table.py --device cuda --dtype bfloat16 --shapes 400M-distill,3B \\
        --workloads greedy-b1,beam10-ngram3-b1,greedy-b32 --impls transformers,torch,flax,hf4-flax

Implementations (--impls; one that is not installed is skipped with a note):
  transformers          transformers 5 PyTorch generate
  torch                 ours, PyTorch (on CUDA the decoder step replays a CUDA graph)
  torch-int8            ours, PyTorch with int8 weights (blenderbot_mb.torch.quantize_int8; CPU)
  torch-single-row      ours, PyTorch with weights stored [in, out] (torch.cpu_layout.single_row_layout; CPU)
  torch-fused           ours, PyTorch, the decoder step written for decoding (generate(fused=True))
  torch-fused-compile   the same step compiled (generate(fused=True, compile=True); inductor)
  torch-kernels         ours, PyTorch: one row's step as Triton kernels, several rows' fused and compiled
                        (generate(kernels=True); CUDA)
  torch-packed          the fused step over weights prepared for the row count (generate(packed=True); CPU)
  torch-packed-compile  the same, compiled (one row only: several rows run oneDNN tensors eagerly)
  torch-freeze          the fused step compiled with the weights frozen in (generate(compile=True, freeze=True); CPU)
  torch-freeze-autotune the same in mode max-autotune-no-cudagraphs (inductor's C++ GEMM kernels where faster)
  torch-packed-freeze   packed weights for several rows, the frozen max-autotune step for one row
                        (pack_decoding(compile_one_row=True))
  tf                    ours, TensorFlow, generate compiled with XLA
  flax                  ours, JAX/Flax, jitted generate
  ct2-float32, ct2-int8 CTranslate2 on our export (convert --to ctranslate2; CPU)
  hf4-flax              transformers 4.x Flax generate under jax.jit, in a worker process run by the Python
                        given with --hf4-python (transformers 5 has no Flax classes); skipped without it
A name may end in @N to run it with N PyTorch threads (torch@1, torch-int8@2); --threads sets the rest.

Every implementation gets the same random weights of the shape and the same inputs (40-token contexts,
exactly --new-tokens new tokens: min length = max length, no forced eos). The runs alternate round by round,
so load from other work hits all of them; best of --repeats after a warm-up. Printed: ms per decoding step
(beam search: per step of the whole beam), s per reply, tokens/s, each of ours over each reference, tokens
equal to transformers', and the hardware limit: the bytes of weights one decoding step reads, over the
memory bandwidth measured in this run. --chart writes a matplotlib chart, --docs replaces this device's
results in a markdown file (docs/benchmarks.md) between markers, with the date, device and load.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside PyTorch on one GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from benchmark_generate import _trim_padding, make_config  # noqa: E402

from blenderbot_mb.errors import BlenderbotError  # noqa: E402

WORKLOADS = {"greedy-b1": (1, 1, 0), "beam10-b1": (1, 10, 0), "beam10-ngram3-b1": (1, 10, 3),
             "greedy-b8": (8, 1, 0), "greedy-b32": (32, 1, 0)}  # (batch, beams, n-gram blocking both sides)
IMPLS = ("transformers", "torch", "torch-int8", "torch-single-row", "torch-fused", "torch-fused-compile", "torch-kernels",
         "torch-packed", "torch-packed-compile", "torch-freeze", "torch-freeze-autotune",
         "torch-packed-freeze", "tf", "flax", "ct2-float32", "ct2-int8", "hf4-flax")
LABELS = {"transformers": "transformers 5 PyTorch", "torch": "ours PyTorch", "torch-int8": "ours PyTorch int8",
          "torch-single-row": "ours PyTorch, [in, out] weights", "torch-fused": "ours PyTorch fused",
          "torch-fused-compile": "ours PyTorch fused, compiled", "torch-kernels": "ours PyTorch Triton kernels",
          "torch-packed": "ours PyTorch packed",
          "torch-packed-compile": "ours PyTorch packed, compiled", "torch-freeze": "ours PyTorch frozen, compiled",
          "torch-freeze-autotune": "ours PyTorch frozen, max-autotune",
          "torch-packed-freeze": "ours PyTorch packed, one row frozen",
          "tf": "ours TF (XLA)", "flax": "ours Flax (jit)", "ct2-float32": "CTranslate2 float32",
          "ct2-int8": "CTranslate2 int8", "hf4-flax": "transformers 4.x Flax (jit)"}
OURS = ("torch", "torch-int8", "torch-single-row", "torch-fused", "torch-fused-compile", "torch-kernels", "torch-packed",
        "torch-packed-compile", "torch-freeze", "torch-freeze-autotune",
        "torch-packed-freeze", "tf", "flax")
REFERENCES = ("transformers", "hf4-flax", "ct2-float32", "ct2-int8")
DEFAULTS = {"cpu": ("greedy-b1,beam10-b1,beam10-ngram3-b1", "transformers,torch,torch-packed,torch-packed-freeze,torch-int8,tf,flax,"
                    "ct2-float32,ct2-int8,hf4-flax"),
            "cuda": ("greedy-b1,beam10-ngram3-b1,greedy-b32", "transformers,torch,torch-kernels,flax,hf4-flax")}


class Skip(Exception):
    """An implementation that cannot run here (not installed, not on this device): a note, not a failure."""


# ---------------------------------------------------------------------- implementations
def build(names, config, base, args, folder) -> dict:
    """{name: generate(ids, mask, settings) -> numpy ids} for those that can run; notes for the rest."""
    runs, notes = {}, {}
    for name in names:
        kind, _, threads = name.partition("@")
        try:
            fn = BUILDERS[kind](config, base, args, folder)
        except Skip as e:
            notes[name] = str(e)
            continue
        runs[name] = with_threads(fn, int(threads)) if threads else fn
    return runs, notes


def with_threads(fn, threads: int):
    import torch

    def run(*a):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(*a)
        finally:
            torch.set_num_threads(before)
    return run


def torch_generate(model, device, **options):
    """generate() with `options` (fused=, compile=, packed=) added to every call's settings."""
    import torch

    def run(ids, mask, settings):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                                 **settings, **options)
        return out.cpu().numpy()
    return run


def build_torch(config, base, args, folder):
    import torch

    dtype = getattr(torch, args.dtype)
    model = base if (args.device, dtype) == ("cpu", torch.float32) else copy.deepcopy(base).to(args.device, dtype)
    return torch_generate(model, args.device)


def build_torch_step(**options):
    def builder(config, base, args, folder):
        import torch

        if options.get("packed") and (args.device, args.dtype) != ("cpu", "float32"):
            raise Skip("packed weights are a float32 CPU path")
        if options.get("freeze") and args.device != "cpu":
            raise Skip("frozen steps are a CPU path")
        if options.get("kernels") and args.device != "cuda":
            raise Skip("Triton kernels are a GPU path")
        dtype = getattr(torch, args.dtype)
        model = base if (args.device, dtype) == ("cpu", torch.float32) else copy.deepcopy(base).to(args.device, dtype)
        return torch_generate(model, args.device, **options)
    return builder


def build_torch_int8(config, base, args, folder):
    from blenderbot_mb.torch import quantize_int8

    if args.device != "cpu" or args.dtype != "float32":
        raise Skip("int8 weights are a float32 CPU path")
    return torch_generate(quantize_int8(copy.deepcopy(base)), "cpu")


def build_torch_single_row(config, base, args, folder):
    from blenderbot_mb.torch.cpu_layout import single_row_layout

    if args.device != "cpu" or args.dtype != "float32":
        raise Skip("the single-row layout is a float32 CPU path")
    return torch_generate(single_row_layout(copy.deepcopy(base)), "cpu")


def build_transformers(config, base, args, folder):
    import torch

    try:
        import transformers
    except ImportError:
        raise Skip("transformers is not installed") from None
    hf_config = transformers.BlenderbotConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.BlenderbotForConditionalGeneration(hf_config)
    model.load_state_dict(base.state_dict(), assign=True, strict=False)  # shared on the CPU, copied by .to()
    model.tie_weights()
    return torch_generate(model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval(), args.device)


def numpy_weights(config, base) -> dict:
    from blenderbot_mb.naming import tensor_names

    state = base.state_dict()
    return {k: state[k].numpy() for k in tensor_names(config)}


def build_tf(config, base, args, folder):
    try:
        import keras
        import tensorflow as tf
    except ImportError:
        raise Skip("tensorflow is not installed") from None
    from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

    if args.device == "cuda" and not tf.config.list_physical_devices("GPU"):
        raise Skip("tensorflow sees no GPU")
    device = "/GPU:0" if args.device == "cuda" else "/CPU:0"
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.dtype)
    try:
        with tf.device(device):
            model = TFBlenderbotForConditionalGeneration(config)
            model.load_weights_dict(numpy_weights(config, base))
    finally:
        keras.config.set_dtype_policy(policy)
    xla_generate = tf.function(model.generate, jit_compile=True)

    def run(ids, mask, settings):
        with tf.device(device):
            out = xla_generate(tf.constant(ids), attention_mask=tf.constant(mask), **settings)
        s = model.generation_config.resolve(config, **settings)
        fill = (s.pad_token_id or s.eos_token_id) if s.num_beams > 1 else (s.pad_token_id or 0)
        return _trim_padding(out.numpy().astype(np.int64), fill, s.eos_token_id)
    return run


def build_flax(config, base, args, folder):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise Skip("jax is not installed") from None
    from blenderbot_mb.checkpoint_msgpack import params_from_tensors
    from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

    if args.device == "cuda" and jax.default_backend() != "gpu":
        raise Skip(f"jax runs on {jax.default_backend()}, not a GPU")
    dtype = getattr(jnp, args.dtype)
    params = params_from_tensors(numpy_weights(config, base), config, "BlenderbotForConditionalGeneration")
    params = jax.tree_util.tree_map(lambda t: jnp.asarray(t, dtype), params)
    model = FlaxBlenderbotForConditionalGeneration(config, dtype=dtype, _do_init=False, params=params)
    return lambda ids, mask, settings: np.asarray(model.generate(ids, attention_mask=mask, **settings).sequences)


def saved(base, folder) -> str:
    path = os.path.join(folder, "model")
    if not os.path.isdir(path):
        base.save_pretrained(path)
    return path


def build_ct2(variant):
    def builder(config, base, args, folder):
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise Skip("ctranslate2 is not installed") from None
        from blenderbot_mb.export import export_model
        from blenderbot_mb.export.ctranslate2 import CTranslate2Blenderbot

        if args.device != "cpu":
            raise Skip("CTranslate2 runs on the CPU here")
        target = os.path.join(folder, "ct2")
        if not os.path.isdir(target):
            export_model(saved(base, folder), target, to="ctranslate2")
        bot = CTranslate2Blenderbot.from_pretrained(target, variant=variant, intra_threads=args.threads)
        return lambda ids, mask, settings: np.asarray(bot.generate(ids, mask, **settings))
    return builder


class HF4Worker:
    """hf4_flax_worker.py in the Python of --hf4-python, fed one request a line."""

    def __init__(self, python: str, path: str | None, folder: str, dtype: str):
        env = dict(os.environ, PYTHONPATH=path or "")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf4_flax_worker.py")
        self.process = subprocess.Popen([python, worker, folder, dtype], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        ready = self.process.stdout.readline()
        if not ready:
            raise Skip(f"the worker in {python} did not start (transformers 4.x, jax and flax installed there?)")
        self.version = json.loads(ready)["ready"]

    def __call__(self, ids, mask, settings):
        request = {"ids": ids.tolist(), "mask": mask.tolist(), "settings": settings}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise Skip("the worker ended")
        reply = json.loads(line)
        if "error" in reply:
            raise Skip(reply["error"])
        return np.asarray(reply["ids"])


def build_hf4(config, base, args, folder):
    from blenderbot_mb.convert import convert_checkpoint

    if not args.hf4_python:
        raise Skip("no second environment given (--hf4-python)")
    target = os.path.join(folder, "flax")
    if not os.path.isdir(target):
        convert_checkpoint(saved(base, folder), target, to="flax", dtype=args.dtype)
    return HF4Worker(args.hf4_python, args.hf4_path, target, args.dtype)


BUILDERS = {"transformers": build_transformers, "torch": build_torch, "torch-int8": build_torch_int8,
            "torch-single-row": build_torch_single_row, "torch-fused": build_torch_step(fused=True),
            "torch-fused-compile": build_torch_step(fused=True, compile=True),
            "torch-kernels": build_torch_step(kernels=True),
            "torch-packed": build_torch_step(packed=True), "torch-packed-compile": build_torch_step(packed=True, compile=True),
            "torch-freeze": build_torch_step(compile=True, freeze=True),
            "torch-freeze-autotune": build_torch_step(compile="max-autotune-no-cudagraphs", freeze=True),
            "torch-packed-freeze": build_torch_step(packed=True, compile="max-autotune-no-cudagraphs", freeze=True),
            "tf": build_tf, "flax": build_flax, "ct2-float32": build_ct2("float32"), "ct2-int8": build_ct2("int8"),
            "hf4-flax": build_hf4}


# ---------------------------------------------------------------------- the hardware limit
def step_bytes(config, bytes_per_weight: float) -> float:
    """Weights one decoding step reads: per decoder layer self-attention q/k/v/out, cross-attention q/out
    (its keys/values are computed once per reply), the feed-forward pair; then the LM head."""
    d, ffn = config.d_model, config.decoder_ffn_dim
    return bytes_per_weight * (config.decoder_layers * (6 * d * d + 2 * d * ffn) + config.vocab_size * d)


class Bandwidth:
    """Bytes/s this run sees, the best of all probes so far: a sum over 512 MiB (CPU) or a copy of it (GPU).
    measure() probes once a round, so the limit comes from the calmest moment, as the times do."""

    def __init__(self, device: str, given_gb_s: float | None = None):
        import torch

        self.given = given_gb_s is not None
        self.best = 1e9 * given_gb_s if self.given else 0.0
        self.x = None if self.given else torch.ones(1 << 27, device=device)
        self.y = torch.empty_like(self.x) if device == "cuda" and not self.given else None

    def __call__(self) -> None:
        import torch

        if self.given:
            return
        cuda = self.x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.y.copy_(self.x) if cuda else self.x.sum()
        if cuda:
            torch.cuda.synchronize()
        self.best = max(self.best, (2 if cuda else 1) * self.x.numel() * 4 / (time.perf_counter() - start))


def limit_ms(step_bytes_: float, bytes_per_s: float) -> float:
    return 1000 * step_bytes_ / bytes_per_s


# ---------------------------------------------------------------------- timing
def settings_for(workload: str, new_tokens: int) -> dict:
    _, beams, ngram = WORKLOADS[workload]
    return dict(num_beams=beams, max_length=1 + new_tokens, min_length=1 + new_tokens, do_sample=False,
                no_repeat_ngram_size=ngram, encoder_no_repeat_ngram_size=ngram, length_penalty=1.0,
                early_stopping=False, forced_eos_token_id=None)


def measure(runs: dict, ids, mask, settings, repeats: int, probe: Bandwidth):
    """Best seconds per implementation (warm-up first, then rounds in turn), outputs, n/a reasons, and the
    seconds of each warm-up call (compiling, packing weights)."""
    outputs, failed, first = {}, {}, {}
    for name, fn in runs.items():
        start = time.perf_counter()
        try:
            outputs[name] = fn(ids, mask, settings)
        except (Skip, BlenderbotError) as e:  # a setting it refuses (e.g. CTranslate2's encoder n-grams)
            failed[name] = str(e)
        first[name] = time.perf_counter() - start
    times = {name: float("inf") for name in outputs}
    for _ in range(repeats):
        probe()
        for name in outputs:
            start = time.perf_counter()
            runs[name](ids, mask, settings)
            times[name] = min(times[name], time.perf_counter() - start)
    return times, outputs, failed, first


def same_tokens(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# ---------------------------------------------------------------------- report
def fmt(x: float) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 1000 else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def tables(rows: list[dict], names: list[str]) -> str:
    """Markdown: ms/step per implementation with the limit; the ratios of ours to each reference."""
    ours = [n for n in names if n.split("@")[0] in OURS]
    refs = [n for n in names if n.split("@")[0] in REFERENCES]
    out = ["| shape | workload | " + " | ".join(LABELS[n.split("@")[0]] + (f" ({n.split('@')[1]} thr)" if "@" in n
                                                                         else "") for n in names)
           + " | limit fp / int8 | same tokens as transformers |",
           "|---" * (len(names) + 4) + "|"]
    for r in rows:
        cells = [fmt(r["ms"].get(n)) if n in r["ms"] else "n/a" for n in names]
        same = ", ".join(n for n, s in r["same"].items() if s) or "-"
        out.append(f"| {r['shape']} | {r['workload']} | " + " | ".join(cells)
                   + f" | {fmt(r['limit'])} / {fmt(r['limit_int8'])} | {same} |")
    out += ["", "ours / reference (below 1: ours is faster), same run:", "",
            "| shape | workload | " + " | ".join(f"{a} / {b}" for a in ours for b in refs) + " |",
            "|---" * (len(ours) * len(refs) + 2) + "|"]
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "-" for a in ours for b in refs]
        out.append(f"| {r['shape']} | {r['workload']} | " + " | ".join(cells) + " |")
    out += ["", "| shape | workload | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        cells = [f"{r['reply_s'][n]:.3f} s, {fmt(r['tok_s'][n])} tok/s" if n in r["ms"] else "n/a" for n in names]
        out.append(f"| {r['shape']} | {r['workload']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def chart(rows: list[dict], names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.45 * len(names) * len(rows) + 1.2), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        shown = [n for n in names if n in r["ms"]]
        ax.barh(range(len(shown)), [r["ms"][n] for n in shown], color=["tab:blue" if n.split("@")[0] in OURS
                                                                       else "tab:gray" for n in shown])
        ax.set_yticks(range(len(shown)), [n for n in shown])
        ax.invert_yaxis()
        ax.axvline(r["limit"], color="tab:red", linestyle="--", label="limit (weights / bandwidth)")
        if any(n.split("@")[0].endswith("int8") for n in shown):
            ax.axvline(r["limit_int8"], color="tab:orange", linestyle=":", label="limit, int8 weights")
        ax.set_title(f"{r['shape']} {r['workload']}", fontsize=9)
        ax.set_xlabel("ms per decoding step (ours blue, references gray)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from blenderbot_mb.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def update_docs(path: str, key: str, text: str) -> None:
    """Replace the text between this device's markers in `path`, or add it at the end of the file."""
    from blenderbot_mb.fileio import atomic_write_text

    begin, end = f"<!-- speed-table:{key} -->", f"<!-- /speed-table:{key} -->"
    doc = open(path, encoding="utf-8").read()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, doc)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def public_args(argv: list[str]) -> list[str]:
    """The command line as the docs show it: the second environment's paths belong to one machine."""
    hidden = ("--hf4-python", "--hf4-path")
    out = []
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in hidden and "=" in arg:
            arg = f"{name}={name[6:].upper()}"
        elif i and argv[i - 1] in hidden:
            arg = argv[i - 1][6:].upper()
        out.append(arg)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shapes", default="400M-distill", help="comma-separated: tiny or presets (400M-distill, 3B, ...)")
    p.add_argument("--workloads", help=f"comma-separated from {', '.join(WORKLOADS)} (default: per device)")
    p.add_argument("--impls", help=f"comma-separated from {', '.join(IMPLS)}, each may end in @THREADS")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch, TF and CTranslate2 threads, and XLA's when 1 (0: their defaults)")
    p.add_argument("--hf4-python", help="a Python with transformers 4.x, jax and flax, for hf4-flax")
    p.add_argument("--hf4-path", help="PYTHONPATH for that Python (e.g. a pip --target folder)")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the limit (default: measured)")
    p.add_argument("--chart", help="write the chart here (PNG)")
    p.add_argument("--docs", help="update this device's results in this markdown file (docs/benchmarks.md)")
    args = p.parse_args(argv)
    import torch

    if args.threads == 1:  # XLA's CPU backend (TF, Flax, the hf4 worker) on one thread too; read at its start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
        os.environ["NPROC"] = "1"  # the size of XLA's CPU thread pool: without it, its products ran on two cores
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        except ImportError:
            pass
    workloads = (args.workloads or DEFAULTS[args.device][0]).split(",")
    names = (args.impls or DEFAULTS[args.device][1]).split(",")
    load_before = os.getloadavg()
    probe = Bandwidth(args.device, args.bandwidth)
    rows, notes = [], {}
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    for shape in args.shapes.split(","):
        shape = shape if shape == "tiny" or shape.startswith("blenderbot") else f"blenderbot-{shape}"
        config = make_config(shape)
        torch.manual_seed(0)
        base = BlenderbotForConditionalGeneration(config).eval()
        with tempfile.TemporaryDirectory() as folder:
            runs, skipped = build(names, config, base, args, folder)
            notes.update(skipped)
            rng = np.random.default_rng(0)
            for workload in workloads:
                batch = WORKLOADS[workload][0]
                ids = rng.integers(4, config.vocab_size, (batch, args.context)).astype(np.int64)
                ids[:, -1] = config.eos_token_id
                mask = np.ones_like(ids)
                times, outputs, failed, first = measure(runs, ids, mask, settings_for(workload, args.new_tokens),
                                                        args.repeats, probe)
                notes.update({n: f"{workload}: {why}" for n, why in failed.items()})
                ref = outputs.get("transformers")
                rows.append(dict(
                    shape=shape.removeprefix("blenderbot-"), workload=workload,
                    ms={n: 1000 * t / args.new_tokens for n, t in times.items()},
                    reply_s={n: t / batch for n, t in times.items()},
                    tok_s={n: batch * args.new_tokens / t for n, t in times.items()},
                    same={n: same_tokens(o, ref) for n, o in outputs.items() if ref is not None and n != "transformers"},
                    step_bytes=step_bytes(config, {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]),
                    step_bytes_int8=step_bytes(config, 1)))
                print(f"{shape} {workload}: " + ", ".join(f"{n} {fmt(v)}" for n, v in rows[-1]["ms"].items())
                      + " ms/step; first call " + ", ".join(f"{n} {t:.1f}" for n, t in first.items()) + " s",
                      flush=True)
            for fn in runs.values():
                if isinstance(fn, HF4Worker):
                    fn.process.stdin.close()
                    fn.process.wait()
            del runs, base
    load_after = os.getloadavg()
    bytes_per_s = probe.best
    for r in rows:
        r["limit"], r["limit_int8"] = (limit_ms(r[k], bytes_per_s) for k in ("step_bytes", "step_bytes_int8"))
    today = datetime.date.today().isoformat()
    header = (f"{today}, {device_name(args.device)}, {args.dtype}, {args.context}-token contexts, "
              f"{args.new_tokens} new tokens, best of {args.repeats}, threads {args.threads or 'default'}; "
              f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; memory bandwidth "
              f"{bytes_per_s / 1e9:.0f} GB/s ({'given' if probe.given else 'best seen in this run'}). "
              "ms per decoding step:")
    body = tables(rows, [n for n in names if n not in notes or any(n in r["ms"] for r in rows)])
    text = header + "\n\n" + body
    if notes:
        text += "\n\nNot measured: " + "; ".join(f"{n}: {why}" for n, why in notes.items()) + "."
    command = "python benchmarks/speed_table.py " + " ".join(public_args(argv if argv is not None else sys.argv[1:]))
    text += f"\n\n`{command}`"
    if args.chart:
        chart(rows, [n for n in names if any(n in r["ms"] for r in rows)], args.chart,
              f"{today}, {device_name(args.device)}, {args.dtype}")
        text += f"\n\n![ms per step, {args.device}]({os.path.relpath(args.chart, os.path.dirname(args.docs or '.'))})"
    print("\n" + text)
    if args.docs:
        key = "-".join([args.device, args.dtype, args.shapes, ",".join(workloads), f"threads-{args.threads or 'default'}"])
        update_docs(args.docs, key, text)


if __name__ == "__main__":
    main()
