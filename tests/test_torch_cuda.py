"""On a CUDA device: generate() with the decoder step replayed as a CUDA graph gives transformers' tokens.

Skipped without a GPU (CI has none); run on the project's GPU machine with
`python -m pytest tests/test_torch_cuda.py`.
"""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_torch_generation import CASES, make_pair, pad_after_eos  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "odd"])
def pair(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return tuple(t.cuda() for t in make_pair(request.param))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_graph_tokens_equal_transformers(pair, case):
    ours, theirs, ids, mask = pair
    settings = CASES[case]
    expected = pad_after_eos(theirs.generate(ids, attention_mask=mask, **settings).cpu())
    graphed = ours.generate(ids, attention_mask=mask, **settings).cpu()
    eager = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings).cpu()
    assert torch.equal(graphed, expected)
    assert torch.equal(eager, expected)


def test_captured_step_is_reused_across_batches(pair):
    """Inputs of other lengths (same bucket) and new weights loaded in place replay the same graph correctly."""
    ours, theirs, ids, mask = pair
    settings = dict(max_length=12, num_beams=3, min_length=4)
    for length in (10, 7, 9):
        expected = pad_after_eos(theirs.generate(ids[:, :length], attention_mask=mask[:, :length], **settings).cpu())
        assert torch.equal(ours.generate(ids[:, :length], attention_mask=mask[:, :length], **settings).cpu(), expected)
    assert len(ours._cuda_graph_steps) >= 1
    steps = dict(ours._cuda_graph_steps)
    with torch.no_grad():  # new weights in the same tensors: the graph reads them by address
        for p in [*ours.parameters(), *theirs.parameters()]:
            p.mul_(1.5)
    expected = pad_after_eos(theirs.generate(ids, attention_mask=mask, **settings).cpu())
    assert torch.equal(ours.generate(ids, attention_mask=mask, **settings).cpu(), expected)
    assert ours._cuda_graph_steps.keys() == steps.keys()  # replayed, not captured again


DECODING = {"fused": dict(fused=True), "compile": dict(compile=True), "fused-compile": dict(fused=True, compile=True)}


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_fused_and_compiled_steps_give_the_eager_tokens(pair, decoding):
    """float32, beam search: the fused and the inductor-compiled steps, replayed as CUDA graphs (their caches
    reordered by a graph too), give the model's tokens."""
    ours, _, ids, mask = pair
    settings = CASES["beam_published_style"]
    want = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings).cpu()
    assert torch.equal(ours.generate(ids, attention_mask=mask, **DECODING[decoding], **settings).cpu(), want)


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_fused_and_compiled_steps_in_bfloat16(decoding):
    """bfloat16: the same tokens as the model's own step and scores within bfloat16's precision."""
    ours, _, ids, mask = make_pair("tiny")
    ours.to("cuda", torch.bfloat16)
    ids, mask = ids.cuda(), mask.cuda()

    def scored(**kw):
        out = ours.generate(ids, attention_mask=mask, max_length=12, min_length=12, return_dict_in_generate=True,
                            output_scores=True, **kw)
        return out.sequences.cpu(), torch.stack(out.scores).float().cpu().nan_to_num(0, 0, 0)

    want, want_scores = scored()
    got, got_scores = scored(**DECODING[decoding])
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=2e-2, atol=6e-2)
