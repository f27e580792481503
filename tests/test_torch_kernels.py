"""The Triton kernels of the decoder step (blenderbot_mb.torch.kernels) on a CPU, each part in a process of its
own: Triton (like TensorFlow) bundles LLVM, and loading it into a process that imported TensorFlow first aborts
the process; the interpreter (TRITON_INTERPRET=1) is read when Triton is first imported. torch_kernels_cases.py
holds the interpreted cases (each kernel against PyTorch, generate(kernels=True) against the eager step); on a
GPU machine test_torch_cuda.py runs the compiled kernels.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton (the test extra installs it on Linux x86-64)", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))


def start_interpreted_cases() -> None:
    """torch_kernels_cases.py (~10 minutes on one core) in its process, one thread, started early (first in
    its lane)."""
    from helpers import KERNELS_LANE, start_early

    start_early("interpreted kernel cases", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             os.path.join(HERE, "torch_kernels_cases.py")],
                env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}, lane=KERNELS_LANE)


def test_interpreted_kernels_and_kernel_step():
    from helpers import early_result

    start_interpreted_cases()
    code, out, err = early_result("interpreted kernel cases", timeout=1500)
    assert code == 0, out[-8000:] + err[-2000:]
    assert " passed" in out and "skipped" not in out.strip().splitlines()[-1], out[-2000:]


test_interpreted_kernels_and_kernel_step.early = start_interpreted_cases


def test_kernels_are_refused_after_tensorflow_was_imported():
    """A clear error instead of LLVM aborting the process (checked before Triton is imported)."""
    code = f"""
import sys
sys.modules.setdefault("tensorflow", type(sys)("tensorflow"))  # as if imported: the real one takes seconds
sys.path.insert(0, {HERE!r})
import torch
from helpers import make_config
from blenderbot_mb.errors import ConfigError
from blenderbot_mb.torch import BlenderbotForConditionalGeneration
model = BlenderbotForConditionalGeneration(make_config("tiny")).eval()
try:
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, kernels=True)
except ConfigError as e:
    print("refused:", e, "triton loaded:", "triton" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: kernels=True loads Triton" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "triton loaded: False" in done.stdout


COMPILE_FOR_HOPPER = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from blenderbot_mb.torch import kernels as K

def compile(fn, pointers, scalars, constants, warps):
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, launch_pdl=True))

shapes = ((3840, 1280), (1280, 1280), (1280, 5120), (5120, 1280), (8008, 1280))
for dtype, (n, k), gpu in itertools.product(("bf16", "fp32"), shapes, ("", "NVIDIA H100 80GB HBM3")):
    cfg = K.linear_config(n, k, gpu)
    pointers = {n: "*" + dtype for n in ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "g_ptr", "beta_ptr", "y_ptr",
                                         "emb_ptr", "pos_ptr")}
    pointers.update(tok_ptr="*i64", idx_ptr="*i64")
    scalars = dict(N="i32", K="i32", eps="fp32", stride_xm="i32", stride_wn="i32", stride_rm="i32",
                   stride_ym="i32", scale="fp32", stride_em="i32", stride_pm="i32")
    for norm, act, residual, embed in ((True, 1, False, False), (False, 0, True, False), (True, 2, True, False),
                                       (True, 0, False, True)):
        constants = dict(NORM=norm, ACT=act, RESIDUAL=residual, BIAS=True, EMBED=embed, BLOCK_N=cfg.block_n,
                         BLOCK_K=cfg.block_k, ROW=triton.next_power_of_2(k), PDL=True)
        compile(K._linear_kernel, pointers, scalars, constants, cfg.warps)
    pointers = {n: "*" + dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "new_ptr")}
    pointers.update(index_ptr="*i64", mask_ptr="*i64", table_ptr="*i32")
    scalars = dict(L="i32", scale="fp32", **{n: "i32" for n in (
        "stride_qr", "stride_kr", "stride_kh", "stride_kl", "stride_vr", "stride_vh", "stride_vl", "stride_or",
        "stride_nr", "stride_mr", "stride_tr", "D", "ROW0")})
    for self_attention, scale, table, block, warps in (  # one row; a double scale; several rows, beams' table
            (True, "fp32", False, 64, 8), (False, "fp32", False, 64, 8), (True, "fp64", False, 64, 8),
            (True, "fp32", True, 32, 1), (False, "fp32", False, 32, 2)):
        constants = dict(SELF=self_attention, MASK=not self_attention, TABLE=table, WRITE=self_attention and not table,
                         SET_TABLE=table,
                         HD=40, ALIGN=8, BLOCK_L=block, BLOCK_D=64, PDL=True)
        compile(K._attention_kernel, pointers, {**scalars, "scale": scale}, constants, warps)
print("compiled")
"""


def start_compile_for_hopper() -> None:
    """COMPILE_FOR_HOPPER (~1 minute on one core) in its process, started early in the kernels' lane."""
    from helpers import KERNELS_LANE, start_early

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start_early("compile for hopper", [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, lane=KERNELS_LANE)


def test_kernels_compile_for_hopper():
    """The interpreter runs what the GPU compiler may refuse (loop-carried types, shapes): each kernel compiled
    for an H100 (sm_90, programmatic dependent launch on) at the 400M shapes, bf16 and fp32, in a process
    without the interpreter."""
    from helpers import early_result

    start_compile_for_hopper()
    code, out, err = early_result("compile for hopper", timeout=600)
    assert code == 0 and "compiled" in out, err[-3000:]


test_kernels_compile_for_hopper.early = start_compile_for_hopper
