"""On a CUDA device: generate() with the decoder step replayed as a CUDA graph gives transformers' tokens.

Skipped without a GPU (CI has none); run on the project's GPU machine with
`python -m pytest tests/test_torch_cuda.py`.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_torch_generation import CASES, EOS, make_pair, pad_after_eos  # noqa: E402


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
    ours.__dict__.pop("_fused_qkv", None)
    graphed = ours.generate(ids, attention_mask=mask, **settings).cpu()
    assert "_fused_qkv" in ours.__dict__  # the default step on GPUs: the fused one
    eager = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings).cpu()
    forward = ours.generate(ids, attention_mask=mask, fused=False, **settings).cpu()
    assert torch.equal(graphed, expected)
    assert torch.equal(eager, expected)
    assert torch.equal(forward, expected)


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


DECODING = {"fused": dict(fused=True), "compile": dict(compile=True), "fused-compile": dict(fused=True, compile=True),
            "kernels": dict(kernels=True)}


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_fused_and_compiled_steps_give_the_eager_tokens(pair, decoding):
    """float32, beam search: the fused and the inductor-compiled steps, replayed as CUDA graphs (their caches
    reordered by a graph too), give the model's tokens."""
    ours, _, ids, mask = pair
    settings = CASES["beam_published_style"]
    want = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings).cpu()
    assert torch.equal(ours.generate(ids, attention_mask=mask, **DECODING[decoding], **settings).cpu(), want)


def test_kernel_decoding_compiles_one_step_for_every_max_length(pair):
    """kernel_decoding(compile_search=False) (serve --kernels): several rows' compiled step has a cache of the
    model's positions whatever the call's max_length, so calls of other lengths replay it; the tokens are
    the model's forward's."""
    ours, _, ids, mask = pair
    model = type(ours)(ours.config).eval()  # (a deep copy would copy ours' captured CUDA graphs)
    model.load_state_dict(ours.state_dict())
    model = model.cuda().kernel_decoding(compile_search=False)
    for max_length in (9, 12, 10):
        settings = dict(max_length=max_length, min_length=4, num_beams=3)
        want = ours.generate(ids, attention_mask=mask, fused=False, cuda_graph=False, **settings).cpu()
        assert torch.equal(model.generate(ids, attention_mask=mask, **settings).cpu(), want)
    assert {key[1] for key in model._cuda_graph_steps} == {ours.config.max_position_embeddings}


@pytest.mark.parametrize("case", ["greedy_ngram", "beam_published_style"])
def test_kernel_steps_for_one_row_and_several_give_the_eager_tokens(pair, case):
    """float32: kernels=True runs the Triton step for one row and for several (the several-row product kernel:
    greedy, 4 rows; beam search's 20 rows and a batch of 32 as two groups of rows at once, each on a stream of
    its own, the beams of a batch row in both groups); each gives the eager loop's tokens and scores."""
    from blenderbot_mb.torch import kernels

    ours, _, ids, mask = pair
    settings = CASES[case]
    batches = [(ids[:1], mask[:1]), (ids, mask)]
    if case == "greedy_ngram":
        batches.append((ids.repeat(8, 1), mask.repeat(8, 1)))
    kernels._STREAMS.clear()
    ours.__dict__.pop("_cuda_graph_steps", None)  # (steps captured by earlier tests would replay, not run)
    for batch in batches:
        want, want_scores = _scored(ours, *batch, cuda_graph=False, **settings)
        got, scores = _scored(ours, *batch, kernels=True, **settings)
        assert torch.equal(got, want)
        if want_scores is not None:
            torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
    assert {group for _, group in kernels._STREAMS} == {1}  # (the second group's stream)


@pytest.mark.parametrize("rows,n,k", [(1, 80080, 20), (3, 8008, 1), (2, 4096, 64), (5, 1500, 7)])
def test_top_k_kernel_equals_torch_topk(rows, n, k):
    """kernels.top_k, compiled for this GPU: torch.topk's values and indices (no ties in random floats)."""
    from blenderbot_mb.torch import kernels

    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(rows, n, device="cuda", generator=g)
    x[0, ::5] = float("-inf")
    for part in (None, 256):
        values, index = kernels.top_k(x, k, part=part)
        want_values, want_index = torch.topk(x, k)
        assert torch.equal(index, want_index) and torch.equal(values, want_values)


@pytest.mark.parametrize("rows,length", [(10, 100), (4, 8192), (64, 512), (300, 33)])
def test_reorder_rows_kernel_equals_a_gather(rows, length):
    """kernels.reorder_rows in place on the GPU, where a program's warps run at once (several warps, several
    programs): every row's values read before any is written, as torch's gather into a new tensor."""
    from blenderbot_mb.torch import kernels

    g = torch.Generator(device="cuda").manual_seed(rows)
    table = torch.randint(0, 2**30, (rows, length), device="cuda", dtype=torch.int32, generator=g)
    for order in (torch.randperm(rows, device="cuda", generator=g), torch.randint(0, rows, (rows,), device="cuda",
                                                                                 generator=g)):
        want = table[order]
        kernels.reorder_rows(table, order)
        assert torch.equal(table, want)


@pytest.mark.parametrize("case", ["beam_published_style", "beam_return_3_early"])
def test_kernels_beam_search_through_the_top_k_kernel(monkeypatch, case):
    """kernels=True: beam search's top-k over beams x vocabulary by kernels.top_k, inside the compiled search
    of the captured loop (rows this short allowed here): the eager loop's tokens."""
    from torch.profiler import ProfilerActivity, profile

    from blenderbot_mb.torch import kernels

    ours, _, ids, mask = (t.cuda() for t in make_pair("tiny"))
    monkeypatch.setattr(kernels, "TOP_K_SHORTEST", 64)
    monkeypatch.setattr(kernels, "TOP_K_PART", 256)  # several parts: both kernels
    settings = CASES[case]
    want = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings).cpu()
    assert torch.equal(ours.generate(ids, attention_mask=mask, kernels=True, **settings).cpu(), want)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the captured loop replayed: its kernels
        assert torch.equal(ours.generate(ids, attention_mask=mask, kernels=True, **settings).cpu(), want)
    assert any("_top_k_merge_kernel" in e.name for e in prof.events())
    assert any("_reorder_rows_kernel" in e.name for e in prof.events())  # the step an operator of the search


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphed", "eager"])
@pytest.mark.parametrize("case", ["beam_published_style", "beam_return_3_early", "sample"])
def test_default_search_runs_the_top_k_kernel(monkeypatch, case, cuda_graph):
    """Without kernels=, on a GPU the search's long top-k (beam search's, sampling's top_k) is kernels.top_k
    too: transformers' tokens for beam search, and the same samples as torch.topk (no ties in random logits)."""
    from torch.profiler import ProfilerActivity, profile

    from blenderbot_mb.torch import generation, kernels

    ours, theirs, ids, mask = (t.cuda() for t in make_pair("tiny"))
    monkeypatch.setattr(kernels, "TOP_K_SHORTEST", 64)
    monkeypatch.setattr(kernels, "TOP_K_PART", 64 if case == "sample" else 256)  # several parts: both kernels
    assert generation.top_k_kernel_usable(ids.device)
    sample = dict(max_length=14, do_sample=True, top_k=20, seed=3)
    settings = dict(sample if case == "sample" else CASES[case], cuda_graph=cuda_graph)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = ours.generate(ids, attention_mask=mask, **settings).cpu()
    assert any("_top_k_merge_kernel" in e.name for e in prof.events())
    if "sample" in case:
        monkeypatch.setattr(generation, "TOP_K_KERNEL", False)
        assert not generation.top_k_kernel_usable(ids.device)
        want = ours.generate(ids, attention_mask=mask, **settings).cpu()
    else:
        want = pad_after_eos(theirs.generate(ids, attention_mask=mask, **CASES[case]).cpu())
    assert torch.equal(got, want)


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


def test_kernel_step_in_bfloat16_agrees_with_float32():
    """One row in bfloat16 through the Triton kernels against the float32 eager step, each input row alone:
    the share of equal tokens (up to each reply's first difference, teacher forcing aside) and the largest
    score difference, stated and bounded."""
    ours, _, ids, mask = make_pair("tiny")
    ours.cuda()
    low = copy.deepcopy(ours).to(torch.bfloat16)
    same = total = 0
    worst = 0.0
    for row in range(ids.shape[0]):
        batch = dict(input_ids=ids[row:row + 1].cuda(), attention_mask=mask[row:row + 1].cuda(), max_length=12,
                     min_length=12, return_dict_in_generate=True, output_scores=True)
        want = ours.generate(**batch, cuda_graph=False)
        got = low.generate(**batch, kernels=True)
        a, b = want.sequences[0].cpu(), got.sequences[0].cpu()
        agree = int((a != b).long().argmax()) if not torch.equal(a, b) else len(a)
        same, total = same + agree, total + len(a)
        for x, y in list(zip(want.scores, got.scores, strict=True))[:max(agree - 1, 0)]:  # same prefix, same step
            finite = torch.isfinite(x)
            worst = max(worst, (x[finite] - y.float()[finite]).abs().max().item())
    print(f"bf16 kernels vs fp32: tokens agreeing {same / total:.3f}, max score difference {worst:.3g}")
    assert same / total >= 0.9
    assert worst < 0.25


def test_embedded_first_product_rounds_its_row_as_the_model_in_bfloat16():
    """kernels.linear(embed=): the decoder's first row from the embedding tables, each operation rounded to
    bfloat16 as the model's (the row bit for bit), then normed and multiplied."""
    import torch.nn.functional as F

    from blenderbot_mb.torch import kernels as K

    g = torch.Generator(device="cuda").manual_seed(5)
    dt, rows, k, n = torch.bfloat16, 3, 1280, 384

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)

    table, positions, w, b = randn(8008, k), randn(128, k), randn(n, k) * 0.03, randn(n)
    ln = torch.nn.LayerNorm(k, device="cuda", dtype=dt)
    tokens, index, scale = torch.tensor([4, 0, 8007], device="cuda"), torch.tensor([61], device="cuda"), k ** 0.5
    h = torch.full((rows, k), float("nan"), dtype=dt, device="cuda")
    got = K.linear(h, w, b, norm=ln, embed=K.Embedded(tokens, table, scale, positions, index))
    want_h = F.embedding(tokens, table) * scale + F.embedding(index, positions)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(got, K.linear(want_h, w, b, norm=ln), rtol=0, atol=0)  # the same product after


# ---------------------------------------------------------------------- the whole loop body as a CUDA graph
def _scored(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **settings)
    scores = None if out.sequences_scores is None else out.sequences_scores.cpu()
    return out.sequences.cpu(), scores


def _loops(model):
    """{(step key, loop key): CudaGraphLoop} of every step the model keeps."""
    return {(k, key): loop for k, step in model._cuda_graph_steps.items() for key, loop in step.loops.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graphed_loop_body_gives_the_eager_tokens_and_scores(pair, case):
    """float32: the loop body replayed as one CUDA graph per token (beam search's default) gives the tokens of the
    step-only graph (device_loop=False) and of the eager loop, beam scores within 1e-5."""
    ours, _, ids, mask = pair
    settings = CASES[case]
    body, body_scores = _scored(ours, ids, mask, device_loop=True, **settings)
    for other in (dict(device_loop=False), dict(cuda_graph=False)):
        want, want_scores = _scored(ours, ids, mask, **other, **settings)
        assert torch.equal(body, want), other
        if want_scores is not None:
            torch.testing.assert_close(body_scores, want_scores, atol=1e-5, rtol=0)


# compiled steps only for shapes compiled above already
BODY_DECODING = [("fused", case) for case in ("beam_published_style", "greedy_ngram", "beam_never")] + \
    [(decoding, "beam_published_style") for decoding in ("compile", "fused-compile")] + \
    [("kernels", case) for case in ("beam_published_style", "greedy_ngram")]


@pytest.mark.parametrize("decoding,case", BODY_DECODING)
def test_graphed_loop_body_with_fused_and_compiled_steps(pair, decoding, case):
    """float32: the fused and compiled steps run inside the loop body's graph (n-gram blocking on both sides,
    a padded batch) give the eager loop's tokens and scores."""
    ours, _, ids, mask = pair
    settings = CASES[case]
    want, want_scores = _scored(ours, ids, mask, cuda_graph=False, **settings)
    got, scores = _scored(ours, ids, mask, device_loop=True, **DECODING[decoding], **settings)
    assert torch.equal(got, want)
    if want_scores is not None:
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)


def test_graphed_loop_body_is_captured_once_and_replayed_by_later_calls(pair):
    """Later calls with other inputs (other lengths of the same bucket, other encoder n-grams, replies ending
    at other steps) replay the first call's capture and give their own eager tokens."""
    ours, _, ids, mask = pair
    settings = dict(max_length=16, num_beams=4, length_penalty=0.65, min_length=4, no_repeat_ngram_size=3,
                    encoder_no_repeat_ngram_size=1, num_return_sequences=2)  # min_length 4: 3 steps at least
    ours.__dict__.pop("_cuda_graph_steps", None)
    inputs = [(ids, mask), (ids.flip(0), mask.flip(0)), (ids[:, :7] % 50 + 4, mask[:, :7])]
    inputs[2][0][:, -1] = EOS
    captured = None
    for x, m in inputs:
        got, scores = _scored(ours, x, m, **settings)
        want, want_scores = _scored(ours, x, m, cuda_graph=False, **settings)
        assert torch.equal(got, want)
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
        loops = _loops(ours)
        assert len(loops) == 1
        graph = next(iter(loops.values())).graph
        assert graph is not None and graph is (captured or graph)
        captured = graph


@pytest.mark.parametrize("decoding", [{}, dict(fused=True)])
def test_graphed_loop_body_in_bfloat16(decoding):
    """bfloat16: the loop body's graph computes what the step-only graph does: the same tokens."""
    ours, _, ids, mask = make_pair("tiny")
    ours.to("cuda", torch.bfloat16)
    ids, mask = ids.cuda(), mask.cuda()
    for settings in (dict(max_length=14, min_length=14), CASES["beam_published_style"]):
        got, _ = _scored(ours, ids, mask, device_loop=True, **decoding, **settings)
        want, _ = _scored(ours, ids, mask, device_loop=False, **decoding, **settings)
        assert torch.equal(got, want), settings


# ---------------------------------------------------------------------- training: the update as a CUDA graph
def _training_batches(vocab: int, seed: int, padded: bool) -> list[dict]:
    """Two micro-batches of 2 rows x 20 + 20 tokens (the graphed engine's static shape: batch size 2, max
    length 20); `padded`: the second row's tails are padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ids, labels = rng.integers(4, vocab, (2, 20)), rng.integers(4, vocab, (2, 20))
        ids[:, -1] = labels[:, -1] = 2
        mask = np.ones_like(ids)
        if padded:
            mask[1, 14:], ids[1, 14:], labels[1, 9:] = 0, 0, -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _engine(tmp_path, tokenizer_folder, graphs: bool, dropout: float = 0.0, lr: float = 1e-3, compile=False):
    from helpers import training_files

    from blenderbot_mb.torch.training import TorchEngine
    from blenderbot_mb.trainer import prepare_run

    base, data = training_files(str(tmp_path), tokenizer_folder, dropout=dropout)
    engine = TorchEngine(prepare_run(data=data, out=str(tmp_path / "out"), model=base, batch_size=2, grad_accum=2,
                                     lr=lr, weight_decay=0.01, max_grad_norm=0.5, cuda_graphs=graphs, seed=4,
                                     max_length=20, compile=compile))
    if graphs:
        engine.graphed.eager_left = 1  # capture at the 2nd update (the default waits 3, DDP 11)
    return engine


def _steps(engine, sequence, lr=1e-3, steps=None, batches=3):
    """(loss, gradient norm) of an update per entry of `sequence` (padded or not), at `steps` (0, 1, ...),
    on `batches` batches in turn."""
    from blenderbot_mb.training import IGNORE_INDEX

    vocab = engine.model.config.vocab_size
    out = []
    for step, padded in zip(steps or range(len(sequence)), sequence, strict=True):
        micro = _training_batches(vocab, seed=step % batches, padded=padded)
        tokens = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)
        result = engine.train_step(micro, lr=lr, step=step, global_tokens=tokens)
        out.append((float(result["loss"]), float(result["grad_norm"])))
    return out


# unpadded: eager, capture, replay; padded: eager (the mask graph warms up), capture, replay with an unpadded batch
SEQUENCE = (False, False, False, True, True, False)


def test_graphed_update_equals_the_eager_update(tmp_path, tokenizer_folder):
    """fp32 (TF32 off): the graphed updates (two graphs: without and with the encoder mask) give the eager
    engine's losses, gradient norms and weights, and the loss falls."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = _engine(tmp_path / "eager", tokenizer_folder, graphs=False)
    graphed = _engine(tmp_path / "graphed", tokenizer_folder, graphs=True)
    want, got = _steps(eager, SEQUENCE), _steps(graphed, SEQUENCE)
    assert sorted(graphed.graphed.graphs) == [False, True]
    for (loss, norm), (loss_g, norm_g) in zip(want, got, strict=True):
        assert abs(loss_g - loss) <= 1e-5 and abs(norm_g - norm) <= 1e-5 * max(1.0, norm)
    for (name, p), q in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        if not name.endswith("k_proj.bias"):  # softmax ignores them: AdamW steps on rounding noise
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)
    again = _steps(graphed, [False] * 6, lr=1e-2)  # replays, the 3 batches twice: the loss falls
    assert again[3][0] < again[0][0] and again[5][0] < again[2][0]


@pytest.mark.parametrize("compile", ["layers", "model"])
def test_graphed_update_of_compiled_kernels_follows_the_eager_update(tmp_path, tokenizer_folder, compile):
    """fp32 (TF32 off): the graphed update of the compiled layers or model (compiled in the eager updates before
    each capture, both graphs) gives the eager uncompiled engine's losses and gradient norms within 1e-5 and its
    weights within 1e-4 (inductor's fused arithmetic rounds differently; AdamW divides by the gradients' size)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = _engine(tmp_path / "eager", tokenizer_folder, graphs=False)
    graphed = _engine(tmp_path / "graphed", tokenizer_folder, graphs=True, compile=compile)
    want, got = _steps(eager, SEQUENCE), _steps(graphed, SEQUENCE)
    assert sorted(graphed.graphed.graphs) == [False, True]
    for (loss, norm), (loss_g, norm_g) in zip(want, got, strict=True):
        assert abs(loss_g - loss) <= 1e-5 and abs(norm_g - norm) <= 1e-5 * max(1.0, norm)
    for (name, p), q in zip(eager.model.named_parameters(), graphed.model.parameters(), strict=True):
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=0, msg=name)


def test_graphed_dropout_draws_new_masks_each_replay_and_repeats_per_seed(tmp_path, tokenizer_folder):
    """lr 0 (the weights stay), dropout 0.3, one batch: the updates' losses differ from step to step (new masks), and
    depend on the step, not on the replay: a second engine replaying steps 2 and 3 in the other order gives
    the same loss per step."""
    def losses(folder, steps):
        engine = _engine(tmp_path / folder, tokenizer_folder, graphs=True, dropout=0.3, lr=0.0)
        return dict(zip(steps, [loss for loss, _ in _steps(engine, [False] * 5, lr=0.0, steps=steps, batches=1)], strict=True))

    first, second = losses("a", [0, 1, 2, 3, 4]), losses("b", [0, 1, 3, 2, 4])
    assert len({round(first[step], 6) for step in (1, 2, 3, 4)}) == 4, first  # capture, then 3 replays
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-6), (step, first, second)


def test_graph_captures_survive_another_threads_cuda_calls():
    """generate()'s CUDA graph captures refuse only their own thread's unsafe calls: another thread waiting on
    the GPU meanwhile (as JAX's runtime does in a process that runs both frameworks) ends none of them. Each
    max_length below is a new shape: a new step, prefill and loop captured while the other thread waits. (With
    generation.CAPTURE_MODE = "global", PyTorch's default, this failed on an H100: "operation failed due to a
    previous error during capture".)"""
    import threading

    ours, _, ids, mask = make_pair("tiny")
    ours.cuda()
    ids, mask = ids.cuda(), mask.cuda()
    lengths = (9, 11, 13, 15)
    want = [ours.generate(ids, attention_mask=mask, max_length=n, num_beams=3, cuda_graph=False).cpu()
            for n in lengths]
    stop, errors = threading.Event(), []

    def wait_on_the_gpu():  # work on a stream of its own, waited for (no wait on the capturing stream: a
        side = torch.cuda.Stream()  # device-wide synchronize would end any capture)
        x = torch.zeros(1024, device="cuda")
        while not stop.is_set():
            try:
                with torch.cuda.stream(side):
                    x.add_(1)
                side.synchronize()
            except Exception as e:  # (the other thread's own calls may be refused; they must not end captures)
                errors.append(e)

    waiter = threading.Thread(target=wait_on_the_gpu, daemon=True)
    waiter.start()
    try:
        got = [ours.generate(ids, attention_mask=mask, max_length=n, num_beams=3).cpu() for n in lengths]
    finally:
        stop.set()
        waiter.join()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
