"""The fused and the compiled decoder steps (blenderbot_mb.torch.decoding) against the model's own forward:
the same tokens (greedy, beam, sampling with a seed) and the same scores in float32.

The eager path is the oracle here; test_torch_generation checks it against transformers. torch.compile
runs with backend="aot_eager" (the traced graph, functionalized, run by PyTorch: what inductor gets) except
for one inductor case; the inductor cases on a GPU are in test_torch_cuda.py.
"""

import pytest

torch = pytest.importorskip("torch")

from test_torch_generation import CASES, make_pair  # noqa: E402

from blenderbot_mb.errors import ConfigError  # noqa: E402

SEARCHES = {
    "greedy": dict(max_length=14, min_length=3),
    "beam": dict(max_length=15, num_beams=4, length_penalty=0.65),
    "sample": dict(max_length=13, do_sample=True, top_k=0, temperature=1.5, seed=7),
    "beam_sample": dict(max_length=12, do_sample=True, num_beams=3, top_p=0.9, num_return_sequences=2, seed=4),
}


@pytest.fixture(scope="module", params=["tiny", "odd"])
def pair(request):
    ours, _, ids, mask = make_pair(request.param)
    return ours, ids, mask


def scored(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_gives_the_eager_tokens(pair, case):
    ours, ids, mask = pair
    want = ours.generate(ids, attention_mask=mask, **CASES[case])
    assert torch.equal(ours.generate(ids, attention_mask=mask, fused=True, **CASES[case]), want)


@pytest.fixture(scope="module")
def tiny():
    ours, _, ids, mask = make_pair("tiny")
    return ours, ids, mask


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forward"])
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_compiled_step_gives_the_eager_tokens_and_scores(tiny, search, fused):
    ours, ids, mask = tiny
    want, want_scores = scored(ours, ids, mask, **SEARCHES[search])
    ours.compile_decoding(fused=fused, backend="aot_eager")
    try:
        got, got_scores = scored(ours, ids, mask, **SEARCHES[search])
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_inductor_compiled_fused_step_gives_the_eager_tokens():
    ours, _, ids, mask = make_pair("tiny")
    want, want_scores = scored(ours, ids, mask, max_length=10)
    got, got_scores = scored(ours, ids, mask, max_length=10, fused=True, compile=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_changes_in_place_and_checkpoints_do_not_change(pair):
    ours, ids, mask = pair
    names = list(ours.state_dict())
    ours.generate(ids, attention_mask=mask, max_length=8, fused=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(1.25)
    try:
        want = ours.generate(ids, attention_mask=mask, max_length=12)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=12, fused=True), want)
    finally:
        with torch.no_grad():
            for p in ours.parameters():
                p.div_(1.25)
    assert list(ours.state_dict()) == names


def test_causal_lm_fused_and_compiled_steps():
    from helpers import make_config, random_batch, random_weights

    from blenderbot_mb.torch import BlenderbotForCausalLM

    config = make_config("tiny")
    ours = BlenderbotForCausalLM(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, "BlenderbotForCausalLM",
                                                                             seed=2).items()}, strict=False)
    prompt = torch.from_numpy(random_batch(config, batch=2, src_len=5, pad=False)["input_ids"])
    for settings in (dict(max_new_tokens=8), dict(max_new_tokens=7, num_beams=3, no_repeat_ngram_size=2)):
        want = ours.generate(prompt, **settings)
        assert torch.equal(ours.generate(prompt, fused=True, **settings), want)
        ours.compile_decoding(backend="aot_eager")
        assert torch.equal(ours.generate(prompt, **settings), want)
        ours.decoding_options = type(ours.decoding_options)()


# ---------------------------------------------------------------------- the device loop's search compiled too
BODY_SEARCHES = {
    "beam-ngram": dict(max_length=15, num_beams=4, length_penalty=0.65, no_repeat_ngram_size=2,
                       encoder_no_repeat_ngram_size=2, num_return_sequences=2),
    "beam-early": dict(max_length=12, num_beams=3, early_stopping=True, min_length=4, bad_words_ids=[[5], [7, 9]],
                       forced_eos_token_id=2),
    "greedy": dict(max_length=11, min_length=3, repetition_penalty=1.3),
}


@pytest.mark.parametrize("search,backend", [(s, "aot_eager") for s in sorted(BODY_SEARCHES)]
                         + [("greedy", "inductor")])  # inductor (C++ on the CPU) for one case (the smallest)
def test_compiled_search_in_the_device_loop_gives_the_eager_tokens_and_scores(tiny, search, backend, monkeypatch):
    """compile= with the device loop (no host read in a step) compiles the search around the step too: the
    eager loop's tokens and sequence scores, and the search's parts did go through torch.compile."""
    from blenderbot_mb.torch import generation

    ours, ids, mask = tiny
    settings = dict(return_dict_in_generate=True, **BODY_SEARCHES[search])
    want = ours.generate(ids, attention_mask=mask, **settings)
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or compile(fn, **kw))
    ours.decoding_options = type(ours.decoding_options)(fused=True, compile=True, backend=backend)
    try:
        got = ours.generate(ids, attention_mask=mask, device_loop=True, **settings)
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    assert {"backend": backend, "dynamic": False} in compiled
    assert torch.equal(got.sequences, want.sequences)
    if want.sequences_scores is not None:
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(generation, "COMPILE_SEARCH", False)  # the switch the benchmarks use
    compiled.clear()
    ours.decoding_options = type(ours.decoding_options)(fused=True, compile=True, backend="aot_eager")
    try:
        again = ours.generate(ids, attention_mask=mask, device_loop=True, **settings)
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    assert torch.equal(again.sequences, want.sequences)
    assert {"backend": "aot_eager", "dynamic": False} not in compiled


def test_compile_modes_with_their_own_cuda_graphs_are_refused(pair):
    ours, ids, mask = pair
    with pytest.raises(ConfigError, match="reduce-overhead"):
        ours.generate(ids, attention_mask=mask, max_length=8, compile="reduce-overhead")
    with pytest.raises(ConfigError):
        ours.compile_decoding(mode="max-autotune")


# ---------------------------------------------------------------------- packed weights (float32 on the CPU)
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_packed_step_gives_the_eager_tokens_and_scores(pair, search):
    ours, ids, mask = pair
    want, want_scores = scored(ours, ids, mask, **SEARCHES[search])
    got, got_scores = scored(ours, ids, mask, packed=True, **SEARCHES[search])
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_packed_weights_are_kept_per_row_kind_and_made_again_after_a_change(tiny):
    ours, ids, mask = tiny
    ours.generate(ids[:1], attention_mask=mask[:1], max_length=6, packed=True)  # one row: [in, out] copies
    ours.generate(ids, attention_mask=mask, max_length=6, packed=True)  # several rows: oneDNN tensors
    kept = dict(ours.__dict__["_packed_weights"])
    assert set(kept) == {"one row", "rows"}
    one, rows = kept["one row"][1], kept["rows"][1]
    weight = ours.model.decoder.layers[0].fc1.weight
    assert torch.equal(one[0][0]["fc1"][0], weight) and one[0][0]["fc1"][0].stride() == (1, weight.shape[0])
    assert rows[0][0]["fc1"][0].is_mkldnn
    ours.generate(ids, attention_mask=mask, max_length=6, packed=True)
    assert ours.__dict__["_packed_weights"]["rows"][1] is rows  # unchanged weights: reused
    with torch.no_grad():
        weight.mul_(1.25)
    try:
        want = ours.generate(ids, attention_mask=mask, max_length=12)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=12, packed=True), want)
        assert ours.__dict__["_packed_weights"]["rows"][1] is not rows
    finally:
        with torch.no_grad():
            weight.div_(1.25)


def test_packed_one_row_step_compiles(tiny):
    ours, ids, mask = tiny
    want, want_scores = scored(ours, ids[:1], mask[:1], max_length=10)
    ours.decoding_options = type(ours.decoding_options)(fused=True, packed=True, compile=True, backend="aot_eager")
    try:
        got, got_scores = scored(ours, ids[:1], mask[:1], max_length=10)
        several = ours.generate(ids, attention_mask=mask, max_length=10)  # oneDNN tensors: run eagerly
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(several, ours.generate(ids, attention_mask=mask, max_length=10))


def test_pack_decoding_and_its_refusals(tiny):
    ours, ids, mask = tiny
    want = ours.generate(ids, attention_mask=mask, max_length=12, num_beams=3)
    assert ours.pack_decoding() is ours
    try:
        assert ours.decoding_options.packed and ours.decoding_options.fused
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=12, num_beams=3), want)
    finally:
        ours.pack_decoding(False)
    assert ours.decoding_options == type(ours.decoding_options)()
    with pytest.raises(ConfigError, match="fused=True"):
        type(ours.decoding_options)(packed=True)
    half = make_pair("tiny")[0].to(torch.bfloat16)
    with pytest.raises(ConfigError, match="float32 CPU"):
        half.generate(ids, attention_mask=mask, max_length=6, packed=True)
    from blenderbot_mb.torch import quantize_int8

    with pytest.raises(ConfigError, match="int8 layers"):
        quantize_int8(make_pair("tiny")[0]).generate(ids, attention_mask=mask, max_length=6, packed=True)


# ---------------------------------------------------------------------- weights frozen into the compiled step (CPU)
def test_frozen_step_gives_the_eager_tokens_and_compiles_again_after_a_weight_changes():
    ours, _, ids, mask = make_pair("tiny")
    settings = dict(max_length=10, num_beams=2)
    want, want_scores = scored(ours, ids, mask, **settings)
    got, got_scores = scored(ours, ids, mask, compile=True, freeze=True, **settings)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours.model.decoder.layers[0].fc2.weight.mul_(3.0)  # a frozen copy would keep the old values
        ours.final_logits_bias[0, 5] += 100.0
    want = ours.generate(ids, attention_mask=mask, **settings)
    assert not torch.equal(want, got)  # the change shows in the tokens
    assert torch.equal(ours.generate(ids, attention_mask=mask, compile=True, freeze=True, **settings), want)


def test_freeze_needs_the_compiled_fused_step(tiny):
    ours, ids, mask = tiny
    with pytest.raises(ConfigError, match="freeze=True"):
        ours.generate(ids, attention_mask=mask, max_length=6, freeze=True)


def test_packed_decoding_with_a_frozen_one_row_step():
    """pack_decoding(compile_one_row=...): one row runs the frozen compiled step, several the packed weights."""
    ours, _, ids, mask = make_pair("tiny")
    want_one, want_scores = scored(ours, ids[:1], mask[:1], max_length=10)
    want_beam = ours.generate(ids, attention_mask=mask, max_length=10, num_beams=3)
    ours.pack_decoding(compile_one_row="default")
    got_one, got_scores = scored(ours, ids[:1], mask[:1], max_length=10)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=10, num_beams=3), want_beam)
    assert torch.equal(got_one, want_one)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    made = ours.__dict__["_decode_functions"]
    assert any(o.freeze and not o.packed for o in made) and "rows" in ours.__dict__["_packed_weights"]


def test_compiled_steps_pad_the_encoder_side_to_a_bucket_and_compile_once_for_it(tiny):
    """Inputs of 5 and 7 tokens (one padded, one not) share the compiled step of the 32-position bucket."""
    from torch._dynamo.utils import counters

    ours, ids, mask = tiny
    settings = dict(max_length=9, num_beams=1)
    inputs = [(ids[:1, :5], None), (ids[2:3, :7], mask[2:3, :7])]
    want = [ours.generate(i, attention_mask=m, **settings) for i, m in inputs]
    ours.compile_decoding(backend="aot_eager")
    try:
        ours.generate(ids[:1, :4], **settings)  # compiles the bucket's step
        before = counters["stats"]["unique_graphs"]
        got = [ours.generate(i, attention_mask=m, **settings) for i, m in inputs]
        assert counters["stats"]["unique_graphs"] == before
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_compiled_step_bucket_stops_at_the_models_positions(monkeypatch):
    """A model of 40 positions and an input of 35 tokens: the next multiple of 32 (64) is past the positions,
    so the compiled step's encoder side is padded to 40, the search's bucket for every backend; the eager
    step's tokens."""
    from helpers import make_config, random_batch, random_weights

    from blenderbot_mb.torch import BlenderbotForConditionalGeneration, generation

    config = make_config("tiny", max_position_embeddings=40)
    ours = BlenderbotForConditionalGeneration(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, seed=2).items()}, strict=False)
    ids = torch.from_numpy(random_batch(config, batch=2, src_len=35)["input_ids"])
    settings = dict(max_length=8, num_beams=2)
    want = ours.generate(ids, **settings)
    lengths = []
    monkeypatch.setattr(generation, "bucketed", lambda cross, mask, size, _b=generation.bucketed: lengths.append(
        size) or _b(cross, mask, size))
    ours.compile_decoding(backend="aot_eager")
    try:
        got = ours.generate(ids, **settings)
    finally:
        ours.decoding_options = type(ours.decoding_options)()
    assert lengths == [40]
    assert torch.equal(got, want)


def test_fused_weights_follow_replaced_modules_and_moved_tensors(pair):
    """The fused step's weights are listed once per model and listed again after a module or parameter is
    replaced (torch's registration hooks), and copied again after a tensor moved (a new address)."""
    ours, ids, mask = pair
    ours.generate(ids, attention_mask=mask, max_length=8, fused=True)
    layer = ours.get_decoder().layers[0].self_attn
    old_q, old_k = layer.q_proj, layer.k_proj.weight.data
    try:
        new_q = torch.nn.Linear(old_q.in_features, old_q.out_features)
        with torch.no_grad():
            new_q.weight.copy_(old_q.weight * -2.0)
            new_q.bias.copy_(old_q.bias + 0.5)
        layer.q_proj = new_q  # a module replaced
        want = ours.generate(ids, attention_mask=mask, max_length=12)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=12, fused=True), want)
        layer.k_proj.weight.data = old_k * 3.0  # a tensor moved: same Parameter, new storage
        want = ours.generate(ids, attention_mask=mask, max_length=12)
        assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=12, fused=True), want)
    finally:
        layer.q_proj = old_q
        layer.k_proj.weight.data = old_k


def test_the_fused_step_is_the_default_on_gpus_with_plain_linear_layers():
    """DecodingOptions() resolves to the fused step on CUDA and to the model's forward on the CPU or where a
    Linear layer is replaced (LoRA); fused=True over replaced layers is refused before any step runs."""
    import types

    from blenderbot_mb.torch.decoding import DecodingOptions
    from blenderbot_mb.torch.generation import top_k_kernel_usable
    from blenderbot_mb.torch.lora import add_lora

    ours, _, ids, mask = make_pair("tiny")
    on = lambda device: types.SimpleNamespace(device=torch.device(device), get_decoder=ours.get_decoder)  # noqa: E731
    assert not top_k_kernel_usable(torch.device("cpu"))  # (GPUs: tests/test_torch_cuda.py)
    assert DecodingOptions().fused is None
    assert DecodingOptions().for_rows(on("cuda"), 1).fused is True
    assert DecodingOptions().for_rows(on("cuda"), 8).fused is True
    assert DecodingOptions().for_rows(on("cpu"), 1).fused is False
    assert DecodingOptions().replace(fused=False).for_rows(on("cuda"), 1).fused is False
    assert DecodingOptions().replace(compile=True).for_rows(on("cuda"), 4) == DecodingOptions(fused=True, compile=True)
    want = ours.generate(ids, attention_mask=mask, max_length=8)
    add_lora(ours, rank=2)
    assert DecodingOptions().for_rows(on("cuda"), 1).fused is False  # the forward runs the adapters
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_length=8), want)  # B starts at zero
    with pytest.raises(ConfigError, match="plain Linear"):
        ours.generate(ids, attention_mask=mask, max_length=8, fused=True)
