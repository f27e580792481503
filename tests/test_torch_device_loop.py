"""generate(device_loop=True): the core's search run by TorchOps(eager=False), with no host read inside a step
(on CUDA its loop body is one CUDA graph per step), gives transformers' tokens and the eager loop's tokens and
scores; on the CPU here, and the CUDA graph loop's logic with its CUDA calls replaced by eager ones."""

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_torch_generation import CASES, EOS, make_pair, pad_after_eos  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from blenderbot_mb.search import prepare  # noqa: E402
from blenderbot_mb.torch import generation  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "odd"])
def pair(request):
    return make_pair(request.param)


def scored(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **settings)
    return out.sequences, out.sequences_scores


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_loop_equals_transformers_and_the_eager_loop(pair, case):
    """Every processor, greedy and beam search (n-gram blocking on both sides, length penalties, early
    stopping True / False / "never"), a padded batch whose replies end at different steps."""
    ours, ref, ids, mask = pair
    settings = CASES[case]
    want = pad_after_eos(ref.generate(ids, attention_mask=mask, **settings))
    eager, eager_scores = scored(ours, ids, mask, **settings)
    for decoding in ({}, dict(fused=True)):
        got, scores = scored(ours, ids, mask, device_loop=True, **decoding, **settings)
        assert got.tolist() == want.tolist() == eager.tolist(), decoding
        if scores is not None:
            torch.testing.assert_close(scores, eager_scores, atol=1e-5, rtol=0)


def test_device_loop_beam_scores_equal_transformers(pair):
    ours, ref, ids, mask = pair
    settings = dict(max_length=16, num_beams=4, num_return_sequences=2, length_penalty=0.65, min_length=3,
                    no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=2)
    got = ours.generate(ids[:2], attention_mask=mask[:2], return_dict_in_generate=True, device_loop=True,
                        **settings)
    want = ref.generate(ids[:2], attention_mask=mask[:2], return_dict_in_generate=True, output_scores=True,
                        **settings)
    assert got.sequences.tolist() == pad_after_eos(want.sequences).tolist()
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)
    assert got.beam_indices.tolist() == want.beam_indices.tolist()  # followed in the loop on the device


def test_calls_that_need_the_host_each_step_run_the_eager_loop(pair):
    """The one fallback rule: host hooks, sampling and a caller's logits processors keep the eager loop."""
    ours, _, ids, mask = pair
    cpu = torch.device("cpu")

    def device_loop(**kwargs):
        return generation._device_loop(prepare(ours.generation_config, ours.config, kwargs), True, cpu, True)

    assert device_loop(max_length=10, num_beams=3)
    assert not device_loop(max_length=10, do_sample=True)
    assert not device_loop(max_length=10, num_beams=3, do_sample=True)
    assert not device_loop(max_length=10, output_scores=True, return_dict_in_generate=True)
    assert not device_loop(max_length=10, max_time=5.0)
    assert not device_loop(max_length=10, logits_processor=[lambda ids, scores: scores])
    assert not generation._device_loop(prepare(ours.generation_config, ours.config, {}), None, cpu, True)
    # the defaults on CUDA: beam search's loop body as a graph; greedy search's where its search compiles
    cuda = torch.device("cuda")
    for kwargs, graphs, compiled, want in ((dict(num_beams=3), True, False, True), ({}, True, False, False),
                                           ({}, True, True, True), (dict(do_sample=True), True, True, False),
                                           ({}, False, True, False)):
        request = prepare(ours.generation_config, ours.config, {"max_length": 10, **kwargs})
        assert generation._device_loop(request, None, cuda, graphs, compiled) == want, (kwargs, graphs, compiled)
    out = ours.generate(ids, attention_mask=mask, max_length=12, device_loop=True, output_scores=True,
                        return_dict_in_generate=True)
    assert out.sequences.tolist() == ours.generate(ids, attention_mask=mask, max_length=12).tolist()
    assert len(out.scores) == out.sequences.shape[1] - 1


# ---------------------------------------------------------------------- the CUDA graph loop, simulated
def _host_read(*args, **kwargs):
    raise AssertionError("a host read or write inside the loop body (a CUDA graph cannot hold it)")


HOST_READS = dict.fromkeys(
    ["__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"], _host_read)


class NoHostReads(TorchDispatchMode):
    """Refuses the operators that read a tensor's values on the host, also where PyTorch's C++ calls them (a
    0-d index tensor, masked_fill with a tensor value, a boolean mask)."""

    READS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_consecutive",
             "masked_fill.Tensor", "masked_fill_.Tensor")  # CUDA masked_fill reads a tensor value on the host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS or f"{name}.{func._overloadname}" in self.READS:
            _host_read()
        return func(*args, **(kwargs or {}))


class EagerGraphLoop(generation.CudaGraphLoop):
    """CudaGraphLoop with its CUDA calls done eagerly: a "capture" keeps the step without running it, and each
    replay runs that first call's step again, on the tensors it was made with (what a CUDA graph reads), with
    the Python-level ways of reading a tensor on the host refused."""

    captures = 0

    def _start(self):
        self.went_on = {}

    def _warm_up(self, once):
        once()

    def _capture(self, once):
        EagerGraphLoop.captures += 1

        def replay():  # no host value read, no tensor made from host values
            with mock.patch.multiple(torch.Tensor, **HOST_READS), mock.patch.multiple(
                    torch, tensor=_host_read, as_tensor=_host_read), NoHostReads():
                once()

        return SimpleNamespace(replay=replay)

    def _sent(self, n, copied=False):  # (a real capture copies the flag itself: FLAG_IN_GRAPH)
        self.went_on[n] = bool(self.going)

    def _went_on(self, n):
        return self.went_on[n]


class CompiledLoop(EagerGraphLoop):
    """EagerGraphLoop with its replays unguarded: a compiled function refuses to run under the host read
    guards' dispatch mode."""

    def _capture(self, once):
        EagerGraphLoop.captures += 1
        return SimpleNamespace(replay=once)


def simulate_captures(monkeypatch, loop=EagerGraphLoop):
    """generate()'s CUDA path on the CPU: `loop` for the captured loops, the prefill's graph run as a call."""
    monkeypatch.setattr(generation, "CudaGraphLoop", loop)
    monkeypatch.setattr(generation, "_graphs", lambda device, cuda_graph: cuda_graph)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**34))
    monkeypatch.setattr(generation, "_captured", lambda fn, device: SimpleNamespace(replay=fn))


def test_cuda_graph_loop_logic_on_the_cpu(monkeypatch):
    """generate()'s CUDA path with the captures simulated: the step's static buffers, the prefill (the encoder
    over the bucket's length into them), the encoder n-grams' buffer, one captured body per search, replayed by later calls with other inputs of the same length bucket
    (new n-grams, padding, replies of other lengths), the eager loop's tokens and scores each time."""
    simulate_captures(monkeypatch)
    ours, _, ids, mask = make_pair("tiny")
    beam = dict(max_length=16, num_beams=4, length_penalty=0.65, min_length=3, no_repeat_ngram_size=3,
                encoder_no_repeat_ngram_size=1, num_return_sequences=2, early_stopping=True)
    inputs = [(ids, mask), (ids.flip(0), mask.flip(0)), (ids[:, :7] % 50 + 4, mask[:, :7])]
    inputs[2][0][:, -1] = EOS
    # encoder_no_repeat_ngram_size=1 bans every input token: stale n-grams would change the replies
    loop = dict(device_loop=True)  # greedy search's default here is the step-only graph; beam search's the loop
    for settings in (dict(max_length=14, min_length=2, encoder_no_repeat_ngram_size=1), beam,
                     {**beam, "early_stopping": "never", "encoder_no_repeat_ngram_size": 3, "fused": True}):
        before = EagerGraphLoop.captures
        for x, m in inputs:
            want, want_scores = scored(ours, x, m, cuda_graph=False, **settings)
            got, scores = scored(ours, x, m, **settings, **({} if settings.get("num_beams") else loop))
            assert got.tolist() == want.tolist(), settings
            if scores is not None:
                torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
        assert EagerGraphLoop.captures == before + 1, settings  # the later calls replayed the first capture
    steps = ours._cuda_graph_steps
    assert len(steps) == 3 and all(step.graph is None for step in steps.values())  # none captured on its own


def test_compiled_step_and_search_at_many_lengths(monkeypatch):
    """compile= with the loop body captured (simulated), at more lengths than torch.compile's recompile limit
    (8 shapes per code object, past which a fullgraph compile fails): each length compiles a step and a search
    of its own, and gives the eager loop's tokens and scores. (The replays run without EagerGraphLoop's host
    read guards: a compiled function refuses to run under their dispatch mode.)"""
    simulate_captures(monkeypatch, CompiledLoop)
    ours, _, ids, mask = make_pair("tiny")
    ours.decoding_options = type(ours.decoding_options)(fused=True, compile=True, backend="aot_eager")
    compiles, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: compiles.append(kw) or compile(*a, **kw))
    try:
        wants = {}
        for length in range(6, 16):  # 10 lengths
            settings = dict(max_length=length, num_beams=3, no_repeat_ngram_size=2, return_dict_in_generate=True)
            want = wants[length] = ours.generate(ids, attention_mask=mask, cuda_graph=False, fused=False,
                                                 compile=False, **settings)
            before = EagerGraphLoop.captures
            got = ours.generate(ids, attention_mask=mask, **settings)
            assert EagerGraphLoop.captures == before + 1  # the loop body was captured
            assert got.sequences.tolist() == want.sequences.tolist(), length
            torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)
        assert compiles
        compiles.clear()  # a captured loop's later calls replay it: no torch.compile() call (~2 ms of host time)
        for length in (6, 15):
            settings = dict(max_length=length, num_beams=3, no_repeat_ngram_size=2, return_dict_in_generate=True)
            got = ours.generate(ids, attention_mask=mask, **settings)
            assert got.sequences.tolist() == wants[length].sequences.tolist(), length
        assert compiles == []
    finally:
        ours.decoding_options = type(ours.decoding_options)()


def test_compiled_search_calls_a_captured_step_as_one_operator(monkeypatch):
    """compile= with the loop body captured (simulated): the search before and after the decoder step compiles
    into one graph, the step an operator of it (generation._loop_step), where the step as a graph break split
    it into pieces; both give the eager loop's tokens."""
    import torch._dynamo.utils as dynamo_utils

    simulate_captures(monkeypatch, CompiledLoop)
    ours, _, ids, mask = make_pair("tiny")
    settings = dict(max_length=14, min_length=3, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=2)
    want = ours.generate(ids, attention_mask=mask, cuda_graph=False, **settings)
    ours.decoding_options = type(ours.decoding_options)(fused=True, compile=True, backend="aot_eager")
    graphs = {}
    try:
        for operator in (True, False):
            monkeypatch.setattr(generation, "STEP_OPERATOR", operator)
            ours.__dict__.pop("_cuda_graph_steps", None)  # a new captured loop: its search compiles again
            torch._dynamo.reset()  # (functions other tests compiled compile again here)
            ours.__dict__.pop("_decode_functions", None)
            dynamo_utils.counters.clear()
            got = ours.generate(ids, attention_mask=mask, device_loop=True, **settings)
            assert got.tolist() == want.tolist(), operator
            graphs[operator] = dynamo_utils.counters["stats"]["unique_graphs"]
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    # the search and the compiled step, once each (a new loop's first step runs uncompiled: what the search
    # caches on its first call is there when torch.compile traces it), against a graph a piece of the search
    assert graphs[True] == 2 and graphs[False] > 4, graphs


def test_compiled_steps_around_the_attention_kernel_have_code_of_their_own(monkeypatch):
    """kernels=True's step of several rows, compiled on GPUs: each shape's compiled function has a code object of
    its own. (torch.compile of a functools.partial runs every partial through one shared wrapper frame, so a
    process's ninth compiled shape, of any model, failed on the recompile limit.)"""
    import types

    from blenderbot_mb.torch import decoding

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    ours, *_ = make_pair("tiny")
    fn = decoding.decode_function(ours, decoding.DecodingOptions(fused=True, compile=True, attention_kernel=True))
    fn.make(), fn.make()
    assert len(compiled) == 2 and all(type(f) is types.FunctionType for f in compiled)
    assert compiled[0].__code__ is not compiled[1].__code__
    assert compiled[0].__code__.co_name == "fused_kernel_logits"


def test_captured_step_copies_its_logits_only_where_a_step_outlives_the_next(monkeypatch):
    """The step-only graph returns its output buffer (overwritten by the next replay) unless something keeps a
    step's scores: per-step scores, stopping criteria and other hooks, a caller's processors."""
    monkeypatch.setattr(generation, "_graphs", lambda device, cuda_graph: cuda_graph)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**34))
    monkeypatch.setattr(generation, "_captured", lambda fn, device: SimpleNamespace(replay=fn))
    ours, _, ids, mask = make_pair("tiny")
    want = ours.generate(ids, attention_mask=mask, max_length=10, cuda_graph=False)
    for extra, own in ((dict(), False), (dict(return_dict_in_generate=True, output_scores=True), True),
                       (dict(max_time=60.0), True), (dict(logits_processor=[lambda ids, scores: scores]), True)):
        out = ours.generate(ids, attention_mask=mask, max_length=10, device_loop=False, **extra)
        got = out.sequences if extra.get("return_dict_in_generate") else out
        assert got.tolist() == want.tolist(), extra
        (step,) = ours._cuda_graph_steps.values()
        assert step.own_logits is own, extra


@pytest.mark.parametrize("compiled", [False, True])
def test_top_k_by_rank_equals_a_stable_sort(compiled):
    """The short top-k of the compiled search (ranks from all pairs of a row): largest first, ties in the lower
    index first, NaN above +inf, -0.0 as 0.0, -inf kept; eager and through inductor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 4, (5, 30), generator=g).float() / 4  # many ties
    x[0, ::3] = float("-inf")
    x[1, :] = float("-inf")
    x[2, 5], x[2, 6] = -0.0, 0.0
    x[3, 3], x[3, 1], x[3, 20] = float("nan"), float("inf"), float("nan")
    fn = torch.compile(generation.top_k_by_rank, dynamic=False) if compiled else generation.top_k_by_rank
    for k in (1, 10, 30):
        values, index = fn(x, k)
        x64 = x.double().numpy()
        key = np.where(np.isnan(x64), np.inf, np.where(x64 == np.inf, 1e300, x64))  # NaN above +inf
        want_index = np.argsort(-key, axis=-1, kind="stable")[:, :k]
        want_values = np.take_along_axis(x.numpy(), want_index, axis=-1)
        np.testing.assert_array_equal(index.numpy(), want_index)
        np.testing.assert_array_equal(values.numpy(), want_values)
        want = torch.topk(x[[0, 2, 4]], k)[0]  # rows without NaN: torch.topk's values too
        assert torch.equal(values[[0, 2, 4]], want)
