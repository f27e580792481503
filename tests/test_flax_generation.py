"""Jitted Flax generate() against transformers' PyTorch generate on the same weights; processors jitted."""

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import hf_model, make_config, pad_after_eos, random_batch, random_weights  # noqa: E402

from blenderbot_mb import GenerationConfig  # noqa: E402
from blenderbot_mb.checkpoint_msgpack import params_from_tensors  # noqa: E402
from blenderbot_mb.errors import ConfigError, InputError  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.flax import generation as G  # noqa: E402
from blenderbot_mb.search import prepare  # noqa: E402

LM = "BlenderbotForConditionalGeneration"
BASE = dict(do_sample=False, num_beams=1, early_stopping=False, length_penalty=1.0, min_length=0,
            no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, repetition_penalty=1.0,
            num_return_sequences=1, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = [
    dict(max_length=12),
    dict(max_length=10, min_length=5, no_repeat_ngram_size=2, forced_eos_token_id=2),
    dict(num_beams=4, max_length=12, min_length=3, length_penalty=0.65, no_repeat_ngram_size=3,
         encoder_no_repeat_ngram_size=3, forced_eos_token_id=2, num_return_sequences=2),
    dict(num_beams=3, max_length=9, early_stopping=True, repetition_penalty=1.3, bad_words_ids=[[5], [7, 8]]),
    dict(num_beams=5, max_new_tokens=13, length_penalty=2.0, early_stopping="never", forced_bos_token_id=9),
]


def setup(name="tiny", eos_boost=1.0, seed=3):
    """Weights with a raised eos logit, so that sequences finish at different steps."""
    config = make_config(name)
    weights = random_weights(config, LM, seed=seed)
    weights["final_logits_bias"][0, config.eos_token_id] += eos_boost
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(weights, config, LM))
    return config, weights, FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)


@pytest.fixture(scope="module")
def tiny():
    return setup("tiny", 1.0)


def hf_generate(config, weights, batch, settings):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = hf_model(config, weights, LM)
    with torch.no_grad():
        return pad_after_eos(model.generate(input_ids=torch.from_numpy(batch["input_ids"]),
                                            attention_mask=torch.from_numpy(batch["attention_mask"]),
                                            generation_config=transformers.GenerationConfig(**settings)).numpy())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tokens_match_transformers(tiny, case):
    config, weights, model = tiny
    batch = random_batch(config)
    settings = {**BASE, **CASES[case]}
    ref = hf_generate(config, weights, batch, settings)
    ours = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_odd_config_beam_matches_transformers():
    config, weights, model = setup("odd", 1.5, seed=11)
    batch = random_batch(config, batch=2, src_len=7)
    settings = {**BASE, **dict(num_beams=3, max_length=10, no_repeat_ngram_size=2, num_return_sequences=3)}
    ref = hf_generate(config, weights, batch, settings)
    ours = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    np.testing.assert_array_equal(ours, ref)


def test_generate_inside_an_outer_jit_with_ngram_blocking(tiny):
    """The reference's Flax generate fails with no_repeat_ngram_size on current JAX; ours runs jitted."""
    config, _, model = tiny
    batch = random_batch(config)
    settings = {**BASE, "num_beams": 2, "max_length": 9, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2}
    eager = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    jitted = jax.jit(lambda ids, mask: model.generate(ids, mask, **settings).sequences)(
        batch["input_ids"], batch["attention_mask"])
    jitted = np.asarray(jitted)[:, : eager.shape[1]]  # under an outer jit the output keeps max_length
    np.testing.assert_array_equal(jitted, eager)


def test_compiles_once_per_settings(tiny):
    config, _, model = tiny
    batch = random_batch(config, batch=2)
    settings = {**BASE, "max_length": 6}
    model._generate_fns.clear()
    model.generate(batch["input_ids"], batch["attention_mask"], **settings)
    fn = next(iter(model._generate_fns.values()))
    model.generate(batch["input_ids"], batch["attention_mask"], **settings)
    assert len(model._generate_fns) == 1 and fn._cache_size() == 1


def test_sampling(tiny):
    config, _, model = tiny
    batch = random_batch(config, batch=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    key = jax.random.PRNGKey(7)
    greedy = np.asarray(model.generate(ids, mask, **{**BASE, "max_length": 8}).sequences)
    top1 = np.asarray(model.generate(ids, mask, prng_key=key, **{**BASE, "max_length": 8, "do_sample": True,
                                                                 "top_k": 1}).sequences)
    np.testing.assert_array_equal(top1, greedy)  # top_k=1 leaves only the argmax
    s = {**BASE, "max_length": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "num_return_sequences": 3}
    a = np.asarray(model.generate(ids, mask, prng_key=key, **s).sequences)
    b = np.asarray(model.generate(ids, mask, prng_key=key, **s).sequences)
    assert a.shape[0] == 6 and (a == b).all() and (a[:, 0] == 1).all()
    beam_sample = model.generate(ids, mask, prng_key=key, **{**BASE, "max_length": 8, "do_sample": True,
                                                              "num_beams": 3})
    assert beam_sample.sequences.shape[0] == 2


def test_bad_settings_and_inputs(tiny):
    config, _, model = tiny
    batch = random_batch(config, batch=2)
    with pytest.raises(ConfigError):
        model.generate(batch["input_ids"], max_length=config.max_position_embeddings + 5)
    with pytest.raises(ConfigError):
        model.generate(batch["input_ids"], num_beams=0)
    with pytest.raises(ConfigError, match="num_return_sequences"):
        model.generate(batch["input_ids"], num_beams=2, num_return_sequences=3)
    with pytest.raises(InputError, match="vocabulary"):
        model.generate(np.array([[5, config.vocab_size + 1]]))
    with pytest.raises(InputError, match="position embeddings"):
        model.generate(np.full((1, config.max_position_embeddings + 1), 5))


def test_default_settings_come_from_the_generation_config(tiny):
    config, _, model = tiny
    batch = random_batch(config, batch=2)
    saved = model.generation_config
    model.generation_config = GenerationConfig(max_length=5, decoder_start_token_id=1, eos_token_id=2, pad_token_id=0,
                                               forced_eos_token_id=2)
    try:
        out = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"]).sequences)
    finally:
        model.generation_config = saved
    assert out.shape[1] <= 5 and ((out == 2).any(axis=1)).all()


def test_cached_cross_kv_are_the_projections_and_give_the_plain_decode_logits(tiny):
    """generate()'s step reads the cross K/V projected once; here k_proj/v_proj are NaN for the steps, so a
    step that projected the encoder states again would return NaN."""
    config, weights, model = tiny
    batch = random_batch(config)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    enc = model.encode(ids, mask)
    cross_kv = G._cross_kv(model, model.params, enc.last_hidden_state, mask)
    b, s = ids.shape
    h = config.decoder_attention_heads
    hidden = np.asarray(enc.last_hidden_state)
    for i in range(config.decoder_layers):  # numpy oracle: x @ W.T + b, split into heads [b, h, s, hd]
        stored = cross_kv["model"]["decoder"]["layers"][str(i)]["encoder_attn"]
        for name, proj in (("key", "k_proj"), ("value", "v_proj")):
            w, bias = (weights[f"model.decoder.layers.{i}.encoder_attn.{proj}.{p}"] for p in ("weight", "bias"))
            want = (hidden @ w.T + bias).reshape(b, s, h, -1).transpose(0, 2, 1, 3)
            np.testing.assert_allclose(np.asarray(stored[name]), want, rtol=1e-5, atol=1e-5)

    def poison(path, x):
        keys = [getattr(p, "key", None) for p in path]
        return jnp.full_like(x, jnp.nan) if "encoder_attn" in keys and ({"k_proj", "v_proj"} & set(keys)) else x

    nan_params = jax.tree_util.tree_map_with_path(poison, model.params)
    tokens = jnp.array([[1, 7], [1, 9], [1, 4]][:b], jnp.int32)
    plain = model.init_cache(b, 6)
    cache = model.init_cache(b, 6)
    for t in range(2):
        out = model.decode(tokens[:, t:t + 1], enc, encoder_attention_mask=mask, past_key_values=plain)
        plain = out.past_key_values
        logits, cache = G._decode_step(model, nan_params, cache, cross_kv, tokens[:, t], jnp.int32(t + 1),
                                       enc.last_hidden_state, mask)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(out.logits[:, -1]), rtol=1e-5, atol=1e-5)


def _dot_operand_shapes(jaxpr, inside_loop=False, found=None):
    """{(inside a while body?, operand shape)} of every dot_general, nested jaxprs included."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.update((inside_loop, tuple(v.aval.shape)) for v in eqn.invars)
        for name, value in eqn.params.items():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    loop = inside_loop or (eqn.primitive.name == "while" and name == "body_jaxpr")
                    _dot_operand_shapes(sub, loop, found)
    return found


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_loop_never_projects_the_encoder_states(tiny, monkeypatch, num_beams):
    """No matmul inside the decoding loop takes the (rows, source length, d_model) encoder states."""
    monkeypatch.setattr(G, "_on_gpu", lambda: False)  # the rows as given (GPUs pad a search of few rows)
    config, _, model = tiny
    batch = random_batch(config, batch=2, src_len=9)
    settings = {**BASE, "num_beams": num_beams, "max_length": 12}
    spec = prepare(GenerationConfig(**settings), config, {}).spec
    run = G.partial(G._run, model, spec, ())
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    prompt = jnp.ones((2, 1), jnp.int32)
    found = _dot_operand_shapes(jax.make_jaxpr(run)(model.params, ids, mask, prompt, jax.random.PRNGKey(0), None,
                                                    ids.shape[1]).jaxpr)
    encoder_states = {(False, (2, 9, config.d_model)), (True, (2 * num_beams, 9, config.d_model))}
    assert (False, (2, 9, config.d_model)) in found  # the encoder and the one-time projections
    assert any(inside for inside, _ in found)  # the loop body was walked
    assert not (encoder_states & {f for f in found if f[0]})


@pytest.mark.parametrize("case", [0, 1, 3])
def test_rows_padded_for_gpus_give_the_same_tokens(monkeypatch, case):
    """On GPUs a search of fewer than GPU_ROWS decoder rows runs with copies of the first input added (XLA
    multiplies one row by a weight as a product and a sum): the real rows' tokens and scores are those of
    transformers, and the added rows are dropped. Beam search's top-k over beams x vocabulary runs in parts
    there (parts this short allowed here)."""
    monkeypatch.setattr(G, "_on_gpu", lambda: True)
    monkeypatch.setattr(G, "TOP_K_PART", 32)
    in_parts = []
    monkeypatch.setattr(G, "top_k_in_parts", lambda *a, _f=G.top_k_in_parts: in_parts.append(a[1:]) or _f(*a))
    config, weights, model = setup("tiny", 1.0)
    batch = random_batch(config, batch=1)
    settings = {**BASE, **CASES[case]}
    spec = prepare(GenerationConfig(), config, dict(settings)).spec
    assert G._padding(spec, (), 1) == -(-G.GPU_ROWS // spec.copies) - 1 > 0
    ref = hf_generate(config, weights, batch, settings)
    out = model.generate(batch["input_ids"], batch["attention_mask"], **settings, return_dict_in_generate=True)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert bool(in_parts) == spec.beam
    monkeypatch.setattr(G, "_on_gpu", lambda: False)
    model._generate_fns.clear()
    plain = model.generate(batch["input_ids"], batch["attention_mask"], **settings, return_dict_in_generate=True)
    if spec.beam:
        np.testing.assert_allclose(np.asarray(out.sequences_scores), np.asarray(plain.sequences_scores), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.beam_indices), np.asarray(plain.beam_indices))


def test_rows_are_not_padded_where_a_row_could_be_seen(monkeypatch):
    monkeypatch.setattr(G, "_on_gpu", lambda: True)
    config = make_config("tiny")
    for extra in (dict(do_sample=True), dict(output_scores=True, return_dict_in_generate=True), dict(max_time=5.0)):
        spec = prepare(GenerationConfig(), config, {**BASE, "max_length": 6, **extra}).spec
        assert G._padding(spec, (), 1) == 0, extra
    spec = prepare(GenerationConfig(), config, {**BASE, "max_length": 6}).spec
    assert G._padding(spec, (lambda input_ids, scores, cur_len: scores,), 1) == 0
    assert G._padding(spec, (), G.GPU_ROWS) == 0
    monkeypatch.setattr(G, "_on_gpu", lambda: False)
    assert G._padding(spec, (), 1) == 0


@pytest.mark.parametrize("n,k,part", [(5000, 20, 1024), (4096, 3, 1024), (300, 7, 64), (130, 1, 32)])
def test_top_k_in_parts_equals_lax_top_k(n, k, part):
    """The top-k that JaxOps runs on GPUs for long rows: lax.top_k's values and indices, ties and -inf
    included (the lower index first)."""
    rng = np.random.default_rng(n)
    x = (rng.integers(-6, 6, (3, n)) / 4).astype(np.float32)  # many ties
    x[0, ::7] = -np.inf
    x[1, : n // 2] = -np.inf
    x[2, 1] = np.inf
    values, index = G.top_k_in_parts(jnp.asarray(x), k, part)
    order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")[:, :k]  # independent of lax.top_k
    np.testing.assert_array_equal(np.asarray(index), order)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, order, axis=-1))
    want_values, want_index = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(index), np.asarray(want_index))


def test_long_top_k_runs_in_parts_on_gpus_only(monkeypatch):
    x = jnp.zeros((1, 8 * G.TOP_K_PART))
    assert G.top_k_parts(x.shape[1], 20) == 8 and G.top_k_parts(3 * G.TOP_K_PART, 20) == 1
    assert G.top_k_parts(x.shape[1], G.TOP_K_PART) == 1
    calls = []
    monkeypatch.setattr(G, "top_k_in_parts", lambda *a: calls.append(a[1:]) or jax.lax.top_k(a[0], a[1]))
    monkeypatch.setattr(G, "_on_gpu", lambda: False)
    G.JaxOps().top_k(x, 20)
    assert not calls
    monkeypatch.setattr(G, "_on_gpu", lambda: True)
    G.JaxOps().top_k(x, 20)
    assert calls == [(20, G.TOP_K_PART)]


def test_compiler_options_reach_the_search_on_gpus_only(tiny, monkeypatch):
    """COMPILER_OPTIONS are XLA options for generate()'s jitted search alone (jax.jit(compiler_options=)), on
    GPUs; each set compiles a function of its own, and the options change no token."""
    monkeypatch.setattr(G, "_on_gpu", lambda: False)  # off GPUs first (also on a GPU machine)
    config, _, model = tiny
    batch = random_batch(config, batch=2)
    settings = {**BASE, "max_length": 6}
    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(G.jax, "jit", lambda *a, **k: seen.append(k.get("compiler_options")) or real_jit(*a, **k))
    model._generate_fns.clear()
    plain = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    monkeypatch.setattr(G, "COMPILER_OPTIONS", {"xla_gpu_enable_cublaslt": True})
    model.generate(batch["input_ids"], batch["attention_mask"], **settings)
    assert seen == [None] and len(model._generate_fns) == 1  # off GPUs: not passed, the same function
    monkeypatch.setattr(G, "_on_gpu", lambda: True)
    padded = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    monkeypatch.setattr(G, "COMPILER_OPTIONS", {"xla_gpu_enable_cublaslt": False})
    model.generate(batch["input_ids"], batch["attention_mask"], **settings)
    model.generate(batch["input_ids"], batch["attention_mask"], **settings)
    assert seen == [None, {"xla_gpu_enable_cublaslt": True}, {"xla_gpu_enable_cublaslt": False}]
    assert len(model._generate_fns) == 3
    np.testing.assert_array_equal(padded, plain)


def test_inputs_of_one_bucket_share_a_compile_and_keep_their_tokens(tiny):
    """generate() pads inputs (masked) to their encoder bucket (search.encoder_bucket: multiples of 32, at most
    the model's positions): inputs of 5, 9 and 30 tokens run one compiled search (33: a second), and every
    reply, the encoder n-gram bans included, equals transformers' on the unpadded input."""
    config, weights, model = tiny
    settings = {**BASE, "num_beams": 2, "max_length": 10, "encoder_no_repeat_ngram_size": 2,
                "no_repeat_ngram_size": 2}
    batches = [random_batch(config, batch=2, src_len=n, seed=n) for n in (5, 9, 30, 33)]
    model._generate_fns.clear()
    padded = [np.asarray(model.generate(b["input_ids"], b["attention_mask"], **settings).sequences) for b in batches]
    fns = list(model._generate_fns.values())
    assert len(fns) == 1 and fns[0]._cache_size() == 2  # buckets 32 and 64
    for p, b in zip(padded, batches, strict=True):
        np.testing.assert_array_equal(p, hf_generate(config, weights, b, settings))
    from blenderbot_mb.search import encoder_bucket

    assert [encoder_bucket(w, 64) for w in (1, 32, 33, 60, 64)] == [32, 32, 64, 64, 64]
    assert [encoder_bucket(w, 40) for w in (1, 33, 40)] == [32, 40, 40]


def test_the_buckets_padding_bans_no_n_gram(monkeypatch):
    """The windows of the encoder's n-grams that reach into the bucket's padding are not n-grams of the input:
    a model that favours the pad token keeps repeating it after an unpadded input, as transformers' does (the
    padding's (pad, pad) would ban the second pad)."""
    config = make_config("tiny")
    weights = random_weights(config, LM, seed=5)
    weights["final_logits_bias"][0, config.pad_token_id] += 8.0
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(weights, config, LM))
    model = FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)
    batch = random_batch(config, batch=1, src_len=7, seed=2)
    settings = {**BASE, "max_length": 8, "encoder_no_repeat_ngram_size": 2}
    padded = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    assert (padded[0, 1:] == config.pad_token_id).sum() >= 2
    np.testing.assert_array_equal(padded, hf_generate(config, weights, batch, settings))
    monkeypatch.setattr(G, "encoder_bucket", lambda width, positions: width)
    plain = np.asarray(model.generate(batch["input_ids"], batch["attention_mask"], **settings).sequences)
    np.testing.assert_array_equal(padded, plain)


def test_a_beam_table_reads_what_a_reordered_cache_holds():
    """Beam search with tables (G.with_beam_table): each row writes its new key into its own cache row and
    reorders only the tables; read through them (G.follow_table), the cache is at every step what numpy's
    reorder of the whole cache gives, written the plain way."""
    rng = np.random.default_rng(0)
    rows, heads, length, hd = 5, 2, 7, 3
    cache = {"layers": {"0": {"self_attn": {"cached_key": jnp.zeros((rows, heads, length, hd)),
                                            "cache_index": jnp.array(0, jnp.int32)}}}}
    tabled = G.with_beam_table(cache)
    node = tabled["layers"]["0"]["self_attn"]
    np.testing.assert_array_equal(np.asarray(node["beam_table"]), np.repeat(np.arange(rows)[:, None], length, 1))
    keys, plain = np.zeros((rows, heads, length, hd), np.float32), np.zeros((rows, heads, length, hd), np.float32)
    table = np.asarray(node["beam_table"])
    for step in range(length):
        new = rng.standard_normal((rows, heads, hd)).astype(np.float32)
        plain[:, :, step] = new
        keys[:, :, step] = new  # each row's own cache row
        table = table.copy()
        table[:, step] = np.arange(rows)
        seen = np.asarray(G.follow_table(jnp.asarray(keys), jnp.asarray(table, jnp.int32)))
        np.testing.assert_array_equal(seen[:, :, : step + 1], plain[:, :, : step + 1])
        parents = rng.integers(0, rows, rows)
        plain = plain[parents]
        node = G.reorder_beam_tables({"self_attn": {**node, "beam_table": jnp.asarray(table, jnp.int32)}},
                                     jnp.asarray(parents))["self_attn"]
        assert node["cached_key"] is not None and np.asarray(node["cache_index"]) == 0  # untouched
        table = np.asarray(node["beam_table"])


@pytest.mark.parametrize("case", [2, 3, 4])
def test_beam_search_through_tables_equals_reordering_the_cache(tiny, monkeypatch, case):
    """The shipped beam search (tables) gives the tokens and scores of the search that reorders every layer's
    cache each step, and of transformers; the tables are in its cache."""
    config, weights, model = tiny
    batch = random_batch(config, batch=2)
    settings = {**BASE, **CASES[case]}
    seen = []
    monkeypatch.setattr(G, "with_beam_table", lambda cache, _f=G.with_beam_table: seen.append(1) or _f(cache))
    out = model.generate(batch["input_ids"], batch["attention_mask"], **settings, return_dict_in_generate=True)
    assert seen
    np.testing.assert_array_equal(np.asarray(out.sequences), hf_generate(config, weights, batch, settings))
    monkeypatch.setattr(G, "BEAM_TABLE", False)
    plain = model.generate(batch["input_ids"], batch["attention_mask"], **settings, return_dict_in_generate=True)
    assert len(seen) == 1  # no table in the cache-reordering search
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(plain.sequences))
    np.testing.assert_allclose(np.asarray(out.sequences_scores), np.asarray(plain.sequences_scores), atol=1e-6)


def test_generation_under_jax_enable_x64_gives_transformers_tokens(tiny):
    """jax_enable_x64 (a float64 experiment) makes Python ints int64: the cache's int32 index stays one type
    with the slice's other indices: greedy and beam search give transformers' tokens (sampling writes the
    cache as greedy does)."""
    config, weights, model = tiny
    batch = random_batch(config)
    with jax.enable_x64(True):
        for case in (CASES[1], CASES[2]):
            out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **case).sequences
            expected = hf_generate(config, weights, batch, {**BASE, **case})
            np.testing.assert_array_equal(pad_after_eos(np.asarray(out)), expected)
