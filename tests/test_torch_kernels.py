"""The Triton kernels of the decoder step (blenderbot_mb.torch.kernels), run by Triton's interpreter on the CPU:
each kernel against PyTorch's own operations, and generate(kernels=True) against the eager step (the same
tokens, the same scores in float32). On a GPU machine these are skipped: test_torch_cuda.py runs the compiled
kernels there.
"""

import os

import pytest

torch = pytest.importorskip("torch")
if torch.cuda.is_available():
    pytest.skip("the interpreted kernels are the CPU's tests (test_torch_cuda.py runs them on the GPU)",
                allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from helpers import make_config, random_weights  # noqa: E402
from test_torch_generation import CASES, make_pair  # noqa: E402

from blenderbot_mb.errors import ConfigError  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import kernels as K  # noqa: E402


def norm(k):
    ln = torch.nn.LayerNorm(k, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k", [(37, 50), (64, 16)])
@pytest.mark.parametrize("parts", ["plain", "norm-gelu-residual", "norm-relu"])
def test_linear_equals_torch(rows, n, k, parts):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (n,), (rows, n)))
    ln = norm(k) if parts != "plain" else None
    act = {"plain": None, "norm-gelu-residual": "gelu", "norm-relu": "relu"}[parts]
    res = r if "residual" in parts else None
    want = F.linear(ln(x) if ln is not None else x, w, b)
    want = {None: want, "gelu": F.gelu(want), "relu": F.relu(want)}[act] + (r if res is not None else 0)
    cfg = K.LinearConfig(block_n=16, block_k=16)  # several blocks each way
    got = K.linear(x, w, b, norm=ln, activation=act, residual=res, config=cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_without_bias_into_float32():
    x, w = torch.randn(2, 24, dtype=torch.float64).float(), torch.randn(10, 24)
    got = K.linear(x, w, None, out_dtype=torch.float32)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)


def test_self_attention_writes_the_new_key_and_value_and_attends_up_to_the_index():
    rows, heads, length, hd = 3, 2, 9, 5  # head_dim 5: padded to 8 inside the kernel
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, 3 * heads * hd, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    want_k, want_v, d = k.clone(), v.clone(), heads * hd
    index = 4
    want_k[:, :, index] = qkv[:, d:2 * d].view(rows, heads, hd)
    want_v[:, :, index] = qkv[:, 2 * d:].view(rows, heads, hd)
    got = K.attention(qkv, k, v, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], block_l=2)
    q = qkv[:, :d].view(rows, heads, 1, hd)
    want = F.scaled_dot_product_attention(q, want_k[:, :, :index + 1], want_v[:, :, :index + 1])
    torch.testing.assert_close(got, want.reshape(rows, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)  # the new key written, the rest untouched
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)


def test_cross_attention_gives_masked_keys_no_weight():
    rows, heads, length, hd = 3, 2, 9, 6
    g = torch.Generator().manual_seed(2)
    q = torch.randn(rows, heads * hd, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [0, 1, 1, 0, 1, 1, 1, 1, 0]])
    got = K.attention(q, k, v, heads=heads, mask=mask, block_l=4)
    bias = torch.zeros(rows, length).masked_fill(mask == 0, float("-inf"))[:, None, None]
    want = F.scaled_dot_product_attention(q.view(rows, heads, 1, hd), k, v, attn_mask=bias).reshape(rows, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    v[1, :, 5:] = 1e6  # masked values change nothing
    torch.testing.assert_close(K.attention(q, k, v, heads=heads, mask=mask, block_l=4), got, rtol=0, atol=0)


@pytest.fixture(scope="module")
def pairs():
    return {}


def pair_of(pairs, name):
    if name not in pairs:
        ours, _, ids, mask = make_pair(name)
        pairs[name] = ours, ids, mask
    return pairs[name]


def scored(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("name,case,row", [("tiny", "greedy_encoder_ngram", 0), ("tiny", "greedy_min_length", 3),
                                           ("odd", "greedy_repetition_bad_words", 1)])
def test_kernel_step_gives_the_eager_tokens_and_scores(pairs, name, case, row):
    """One row (a padded one too: row 3 of the batch): the kernels' step."""
    ours, ids, mask = pair_of(pairs, name)
    ids, mask = ids[row:row + 1], mask[row:row + 1]
    want, want_scores = scored(ours, ids, mask, **CASES[case])
    got, got_scores = scored(ours, ids, mask, kernels=True, **CASES[case])
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_several_rows_run_the_fused_step(pairs, monkeypatch):
    """Beam search and batches: kernels=True runs the fused step there (faster on GPUs), the same tokens."""
    from blenderbot_mb.torch import decoding

    ours, ids, mask = pair_of(pairs, "tiny")
    monkeypatch.setattr(K, "kernel_logits", None)  # would fail if called
    ours.__dict__.pop("_decode_functions", None)
    settings = CASES["beam_published_style"]
    assert torch.equal(ours.generate(ids, attention_mask=mask, kernels=True, **settings),
                       ours.generate(ids, attention_mask=mask, **settings))
    options = decoding.DecodingOptions(fused=True, kernels=True).for_rows(ours, 20)
    assert not options.kernels and options.fused and not options.compile  # compiled on GPUs


def test_kernel_step_with_odd_head_size_and_relu():
    config = make_config("relu", d_model=40, decoder_attention_heads=8, encoder_attention_heads=4)  # head_dim 5
    ours = BlenderbotForConditionalGeneration(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, seed=3).items()}, strict=False)
    ids = torch.randint(4, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, do_sample=True, top_k=5, seed=3)):
        want, want_scores = scored(ours, ids, None, **settings)
        got, got_scores = scored(ours, ids, None, kernels=True, **settings)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_kernels_are_refused_with_other_step_options_and_off_the_interpreter(pairs, monkeypatch):
    ours, ids, mask = pair_of(pairs, "tiny")
    with pytest.raises(ConfigError, match="on its own"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True, packed=True)
    with pytest.raises(ConfigError, match="on its own"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True, compile=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="NVIDIA GPUs"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True)


COMPILE_FOR_HOPPER = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from blenderbot_mb.torch import kernels as K

def compile(fn, pointers, scalars, constants, warps):
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, launch_pdl=True))

for dtype, (n, k) in itertools.product(("bf16", "fp32"), ((3840, 1280), (1280, 1280), (1280, 5120), (8008, 1280))):
    cfg = K.linear_config(n, k)
    pointers = {n: "*" + dtype for n in ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "g_ptr", "beta_ptr", "y_ptr")}
    scalars = dict(N="i32", K="i32", eps="fp32", stride_xm="i32", stride_wn="i32", stride_rm="i32",
                   stride_ym="i32")
    for norm, act, residual in ((True, 1, False), (False, 0, True), (True, 2, True)):
        constants = dict(NORM=norm, ACT=act, RESIDUAL=residual, BIAS=True, BLOCK_N=cfg.block_n,
                         BLOCK_K=cfg.block_k, ROW=triton.next_power_of_2(k), PDL=True)
        compile(K._linear_kernel, pointers, scalars, constants, cfg.warps)
    pointers = {n: "*" + dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "new_ptr")}
    pointers.update(index_ptr="*i64", mask_ptr="*i64")
    scalars = dict(L="i32", HD="i32", scale="fp32", **{n: "i32" for n in (
        "stride_qr", "stride_kr", "stride_kh", "stride_kl", "stride_vr", "stride_vh", "stride_vl", "stride_or",
        "stride_nr", "stride_mr", "D")})
    for self_attention, scale in ((True, "fp32"), (False, "fp32"), (True, "fp64")):  # torch.compile: a double
        constants = dict(SELF=self_attention, MASK=not self_attention, BLOCK_L=64, BLOCK_D=64, PDL=True)
        compile(K._attention_kernel, pointers, {**scalars, "scale": scale}, constants, 8)
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The interpreter runs what the GPU compiler may refuse (loop-carried types, shapes): each kernel compiled
    for an H100 (sm_90, programmatic dependent launch on), bf16 and fp32, one row and several, in a process
    without the interpreter."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_kernel_step_of_the_decoder_only_model():
    """BlenderbotForCausalLM: no cross-attention, no final_logits_bias; a prompt run through the step first."""
    from helpers import random_batch

    from blenderbot_mb.torch import BlenderbotForCausalLM

    config = make_config("odd")
    ours = BlenderbotForCausalLM(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, "BlenderbotForCausalLM",
                                                                             seed=2).items()}, strict=False)
    prompt = torch.from_numpy(random_batch(config, batch=1, src_len=5, pad=False)["input_ids"])
    want, want_scores = scored(ours, prompt, None, max_new_tokens=6, no_repeat_ngram_size=2)
    got, got_scores = scored(ours, prompt, None, max_new_tokens=6, no_repeat_ngram_size=2, kernels=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
