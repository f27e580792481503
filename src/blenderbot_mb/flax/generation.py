"""generate() for the Flax backend: the core's search (`blenderbot_mb.search`) over JAX arrays, under jax.jit.

What lives here is only what is JAX: `JaxOps` (the core's array operations), the decoder step on a cache
preallocated for `max_length` positions (every step writes one position, so the loop body has fixed shapes),
the cross-attention keys/values projected once per call, beam search's tables of cache rows (the cache itself
never moves: `with_beam_table`), and the loop driver, `jax.lax.while_loop`. The whole generation compiles once
per (search spec, batch size, encoder bucket); the spec holds the core's processor plan.

Host hooks (streamer, stopping criteria, stop strings, max_time, per-step scores) run from inside the compiled
loop through `jax.experimental.io_callback` (ordered), reaching the hooks of the current call through the
model's `_hook_slot`, so a compiled loop serves every call with the same spec. Inside a caller's own
`jax.jit` (traced inputs) they raise ConfigError naming them. A caller's `logits_processor=` functions,
written with jax.numpy, are traced into the loop.
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from ..errors import ConfigError
from ..generation_hooks import HookSlot, from_hook
from ..logits_process import encoder_ngram_size
from ..outputs import GenerateOutput
from ..scoring import transition_scores
from ..search import (
    Request,
    build_processors,
    check_inputs,
    check_rows_attend,
    decode,
    decoder_prompt,
    encoder_bucket,
    encoder_ngrams,
    generate_inputs,
    generate_output,
    infer_attention_mask,
    prepare,
    record_encoder,
    record_layers,
    refuse_host_hooks,
    stream_ids,
)
from ..search_ops import ArrayOps, NumpyOps

_DTYPES = {"int32": jnp.int32, "float32": jnp.float32, "bool": jnp.bool_}


class JaxOps(ArrayOps):
    """The core's array operations in JAX; the random key is a PRNG key."""

    eager = False
    processor_arguments = ("input_ids", "scores", "cur_len")

    def constant(self, value, dtype):
        return jnp.asarray(value, _DTYPES[dtype])

    def full(self, shape, value, dtype):
        return jnp.full(shape, value, _DTYPES[dtype])

    def arange(self, n):
        return jnp.arange(n, dtype=jnp.int32)

    def cast(self, x, dtype):
        return jnp.asarray(x).astype(_DTYPES[dtype])

    def to_host(self, x):
        return np.asarray(x)

    def where(self, cond, x, y):
        return jnp.where(cond, x, y)

    def masked_fill(self, x, mask, value):
        return jnp.where(mask, jnp.asarray(value, x.dtype), x)

    def fill_columns(self, x, ids, value):
        return x.at[:, np.asarray(ids)].set(value)

    def select(self, pred, if_true, if_false):
        if isinstance(pred, bool):
            return if_true() if pred else if_false()
        return jnp.where(pred, if_true(), if_false())

    def any(self, x, axis=None, keepdims=False):
        return jnp.any(x, axis=axis, keepdims=keepdims)

    def all(self, x, axis=None, keepdims=False):
        return jnp.all(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return jnp.max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return jnp.min(x, axis=axis, keepdims=keepdims)

    def argmax(self, x):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def top_k(self, x, k):
        if _on_gpu() and x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.floating) and top_k_parts(x.shape[1], k) > 1:
            return top_k_in_parts(x, k, TOP_K_PART)
        return lax.top_k(x, k)

    def sort(self, x):
        index = jnp.argsort(x, axis=-1, stable=True).astype(jnp.int32)
        return jnp.take_along_axis(x, index, axis=-1), index

    def take_along(self, x, index, axis):
        return jnp.take_along_axis(x, index, axis=axis)

    def gather_beams(self, x, index):
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


    def column(self, x, index):
        return lax.dynamic_index_in_dim(x, index, axis=x.ndim - 1, keepdims=False)

    def set_column(self, x, index, values):
        return jnp.where(jnp.arange(x.shape[-1]) == index, values[..., None], x)

    def slice_columns(self, x, start, size):
        return lax.dynamic_slice_in_dim(x, jnp.clip(start, 0, x.shape[1] - size), size, axis=1)

    def mark(self, ids, valid, size):
        n = ids.shape[0]
        ids = jnp.where(valid, jnp.minimum(ids, size), size).reshape(n, -1)
        return jnp.zeros((n, size + 1), bool).at[jnp.arange(n)[:, None], ids].set(True)[:, :size]

    def count(self, ids, valid, size):
        n = ids.shape[0]
        ids = jnp.where(valid, jnp.minimum(ids, size), size).reshape(n, -1)
        return jnp.zeros((n, size + 1), jnp.float32).at[jnp.arange(n)[:, None], ids].add(1.0)[:, :size]

    def reshape(self, x, shape):
        return jnp.reshape(x, shape)

    def concat(self, xs, axis):
        return jnp.concatenate(xs, axis=axis)

    def repeat(self, x, count, axis):
        return jnp.repeat(x, count, axis=axis)

    def log_softmax(self, x):
        return jax.nn.log_softmax(x, axis=-1)

    def softmax(self, x):
        return jax.nn.softmax(x, axis=-1)

    def cumsum(self, x):
        return jnp.cumsum(x, axis=-1)

    def sum(self, x, axis=None, keepdims=False):
        return jnp.sum(x, axis=axis, keepdims=keepdims, dtype=x.dtype)

    def exp(self, x):
        return jnp.exp(x)

    def log(self, x):
        return jnp.log(x)

    def streams(self, ids, base=None):
        """Per row a PRNG key: `base` (default PRNGKey(0)) with the row's name folded in word by word."""
        def row_key(words):
            key = jax.random.PRNGKey(0) if base is None else base
            for i in range(words.shape[0]):
                key = jax.random.fold_in(key, words[i])
            return key

        return jax.vmap(row_key)(jnp.asarray(ids, jnp.int32))

    def uniform(self, key, shape):
        pairs = jax.vmap(jax.random.split)(key)  # [N, 2, key]
        return jax.vmap(lambda k: jax.random.uniform(k, shape))(pairs[:, 1]), pairs[:, 0]

    def while_loop(self, cond, body, state, max_steps, lazy=False):
        state = jax.tree_util.tree_map(jnp.asarray, state)
        _, state = lax.while_loop(lambda s: (s[0] < max_steps) & cond(s[1]), lambda s: (s[0] + 1, body(s[1])),
                                  (jnp.int32(0), state))
        return state

    def host_call(self, fn, args, result_rows=None):
        if result_rows is None:
            io_callback(fn, None, *args, ordered=True)
            return None
        shape = jax.ShapeDtypeStruct((result_rows,), jnp.bool_)
        return io_callback(lambda *a: np.asarray(fn(*a), bool), shape, *args, ordered=True)

    def call_processor(self, fn, tokens, cur_len, scores):
        return fn(tokens, scores, cur_len)  # transformers' Flax processor convention


logging.getLogger("jax._src.callback").addFilter(from_hook)  # a hook's error is the call's, not a log line

# ---------------------------------------------------------------------- the step
def _cross_kv(model, params, encoder_hidden_states, encoder_attention_mask):
    """Every decoder layer's cross-attention keys and values of the encoder states (the `cross_kv` collection).

    A one-token decoder pass with the collection mutable stores them; under jit the rest of that pass is
    unused and dropped, so this costs the k_proj/v_proj matmuls once per generate call. The loop body then
    holds no projection of the encoder states at all (instead of relying on XLA to hoist it out).
    """
    ids = jnp.zeros((encoder_hidden_states.shape[0], 1), jnp.int32)
    _, variables = model.module.apply(
        {"params": params}, ids, None, ids, encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask, mutable=["cross_kv"], method=model._decode_method())
    return variables["cross_kv"]


def _decode_step(model, params, cache, cross_kv, token, cur_len, encoder_hidden_states, encoder_attention_mask,
                 record=None):
    """Logits [N, V] (float32) for one new token per row at position cur_len - 1, and the updated cache.

    `cross_kv` (from `_cross_kv`, loop-invariant) holds the cross-attention keys/values, so the step only
    projects the new token's queries against them. `record`: (spec, hooks) of output_attentions /
    output_hidden_states, which get the decoder's per-layer outputs (`search.record_layers`).
    """
    n = token.shape[0]
    positions = jnp.full((n, 1), cur_len - 1, jnp.int32)
    spec = record[0] if record is not None else None
    out, updated = model.module.apply(
        {"params": params, "cache": cache, "cross_kv": cross_kv}, token[:, None], None, positions,
        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
        output_attentions=bool(spec and spec.output_attentions),
        output_hidden_states=bool(spec and spec.output_hidden_states), mutable=["cache"], method="decode_logits")
    if record is not None:
        record_layers(JaxOps(), spec, record[1], cur_len - 1, out.attentions or (), out.cross_attentions or (),
                      out.hidden_states or ())
    return out.logits[:, -1].astype(jnp.float32), updated["cache"]


GPU_ROWS = 4  # on GPUs, fewer decoder rows are padded to this many (see _padding)


def _padding(spec, user_processors, batch: int) -> int:
    """Inputs to add (copies of the first) so a search of `batch` inputs runs at least GPU_ROWS decoder rows,
    on GPUs only: XLA turns a one-row product into a multiply and a sum, often over a weight-sized temporary
    in memory, where a few rows get a real matrix product (an H100 at the 400M shape: 1.11 ms a greedy step
    for one row, 0.66 with three added; docs/benchmarks.md). Rows never mix in greedy or beam search, so the added
    ones change nothing and are dropped. None where a row could be seen: sampling (each row its own stream),
    host hooks, a caller's processors."""
    if (not _on_gpu() or spec.streams_per_input or spec.output_scores or spec.output_logits or spec.layer_outputs
            or spec.host_stops
            or spec.host_stream or user_processors):
        return 0
    return max(0, -(-GPU_ROWS // spec.copies) - batch)


TOP_K_PART = 1024  # on GPUs, a long top-k as the top k of each part of this many values, then of those


def top_k_parts(n: int, k: int) -> int:
    """How many parts `JaxOps.top_k` splits a row of n values into on GPUs (1: lax.top_k on the whole row):
    rows of at least 4 parts, for k of at most half a part (beam search's top 2 x beams of beams x vocabulary)."""
    return -(-n // TOP_K_PART) if n >= 4 * TOP_K_PART and k <= TOP_K_PART // 2 else 1


def top_k_in_parts(x, k: int, part: int):
    """lax.top_k(x, k) over x [rows, n] as the top k of each `part` values, then the top k of those. On GPUs XLA
    runs lax.top_k of a long row as a sort of the whole row (an H100: 70 us for the top 20 of 1 x 80,080
    values, against 32 us in parts of 1024; docs/benchmarks.md). The same values and indices, ties in the lower
    index first: candidates are ordered by part, then by their rank in it (the padding, -inf past the row's
    end, loses every tie to the row's own values)."""
    rows, n = x.shape
    parts = -(-n // part)
    padded = jnp.pad(x, ((0, 0), (0, parts * part - n)), constant_values=-jnp.inf)
    values, index = lax.top_k(padded.reshape(rows, parts, part), k)  # [rows, parts, k]
    index = index + (jnp.arange(parts, dtype=index.dtype) * part)[None, :, None]
    values, best = lax.top_k(values.reshape(rows, parts * k), k)
    return values, jnp.take_along_axis(index.reshape(rows, parts * k), best, axis=-1)


def _bucketed(input_ids, attention_mask, spec, config, gen, traced: bool):
    """The inputs padded (pad id, masked) to their encoder bucket (`search.encoder_bucket`), so the search
    compiles once per bucket, not once per input length. Not inside a caller's jit (its shapes are fixed there),
    nor for inputs shorter than the encoder n-grams (none to ban; padding would make some)."""
    width = input_ids.shape[1]
    size = encoder_bucket(width, config.max_position_embeddings)
    if traced or size == width or width < encoder_ngram_size(spec.plan):
        return input_ids, attention_mask
    pad = ((0, 0), (0, size - width))
    fill = gen.pad_token_id if gen.pad_token_id is not None else config.pad_token_id
    xp = np if isinstance(input_ids, np.ndarray) and isinstance(attention_mask, np.ndarray) else jnp
    return xp.pad(input_ids, pad, constant_values=fill), xp.pad(attention_mask, pad)


def follow_table(cache, table):
    """A self-attention cache [rows, heads, L, hd] as beam search's rows see it: position p of row r is held by
    cache row table[r, p] (table [rows, L] int32). Beam search then reorders the table, never the cache: each
    row writes its new key and value into its own cache row and sets its table entry there."""
    return jnp.take_along_axis(cache, table[:, None, :, None], axis=0)


def with_beam_table(cache):
    """`cache` (init_cache's) with a beam table beside every self-attention's keys and values: each row reads
    its own cache row at every position, until beam search reorders the tables (`reorder_beam_tables`)."""
    def add(tree):
        if not isinstance(tree, dict):
            return tree
        if "cached_key" in tree:
            rows, _, length, _ = tree["cached_key"].shape
            return {**tree, "beam_table": jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))}
        return {name: add(value) for name, value in tree.items()}
    return add(cache)


def reorder_cache(cache, rows):
    """Beam search's reorder of a cache without tables: every buffer taken at the surviving rows."""
    return jax.tree_util.tree_map(lambda x: x[rows] if x.ndim > 0 else x, cache)


def reorder_beam_tables(cache, rows):
    """Beam search's reorder of a cache made by `with_beam_table`: row i continues row rows[i]'s history, so
    it takes that row's tables; the keys and values stay where they are."""
    def reorder(tree):
        if not isinstance(tree, dict):
            return tree
        return {name: value[rows] if name == "beam_table" else reorder(value) for name, value in tree.items()}
    return reorder(cache)


BEAM_TABLE = True  # beam search reorders tables of cache rows, not the cache (with_beam_table)
COMPILER_OPTIONS: dict = {}  # on GPUs, XLA options for generate()'s compiled search only (see _compiler_options)


def _compiler_options() -> dict | None:
    """XLA debug options (`xla_gpu_*` names, as XLA_FLAGS takes them) for generate()'s jitted search on GPUs,
    set for that function alone, never the process (`jax.jit(compiler_options=)`); None elsewhere."""
    return dict(COMPILER_OPTIONS) if COMPILER_OPTIONS and _on_gpu() else None


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _run(model, spec, user_processors, params, input_ids, attention_mask, prompt, prng_key, stream_names, width):
    """Encoder, the cross K/V once, then the core's search from the decoder `prompt` [batch, P]: (sequences
    [rows, L], length, scores or None, beam_indices or None).
    `width`: the caller's input length (int32 scalar); columns past it are padding of the bucket (masked)."""
    batch, extra = input_ids.shape[0], _padding(spec, user_processors, input_ids.shape[0])
    if extra:
        input_ids, attention_mask, prompt = (jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)])
                                             for x in (input_ids, attention_mask, prompt))
        sequences, length, scores, beams = _search(model, spec, user_processors, params, input_ids, attention_mask,
                                                   prompt, prng_key, stream_names, width)
        rows = sequences.shape[0] * batch // (batch + extra)  # (the real rows' beams are rows of the real inputs)
        return sequences[:rows], length, *(None if x is None else x[:rows] for x in (scores, beams))
    return _search(model, spec, user_processors, params, input_ids, attention_mask, prompt, prng_key, stream_names,
                   width)


def _search(model, spec, user_processors, params, input_ids, attention_mask, prompt, prng_key, stream_names,
            width):
    encoded = model.module.apply({"params": params}, input_ids, attention_mask,
                                 jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape),
                                 spec.output_attentions, spec.output_hidden_states,
                                 method=lambda m, *a: m._get_encoder_module()(*a))
    if spec.layer_outputs:  # output_attentions / output_hidden_states
        record_encoder(JaxOps(), spec, model._hook_slot, encoded.attentions or (), encoded.hidden_states or ())
    enc = encoded.last_hidden_state
    cross_kv = _cross_kv(model, params, enc, attention_mask)
    copies = spec.copies
    if copies > 1:  # one row per hypothesis (the cross K/V projected for the batch, then repeated)
        enc, attention_mask = jnp.repeat(enc, copies, axis=0), jnp.repeat(attention_mask, copies, axis=0)
        cross_kv = jax.tree_util.tree_map(lambda x: jnp.repeat(x, copies, axis=0), cross_kv)
    ops = JaxOps()
    grams = encoder_ngrams(ops, spec.plan, input_ids, copies)
    if grams is not None:  # the windows that reach into the bucket's padding: the last real one again (same bans)
        windows = jnp.arange(grams.shape[1])
        grams = grams[:, jnp.minimum(windows, width - grams.shape[2])]
    processors = build_processors(ops, spec.plan, grams)

    record = (spec, model._hook_slot) if spec.layer_outputs else None

    def step(tokens, index, cache):
        return _decode_step(model, params, cache, cross_kv, tokens, index + 1, enc, attention_mask, record)

    cache = model.init_cache(enc.shape[0], spec.max_length)
    reorder = reorder_cache
    if copies > 1 and BEAM_TABLE:
        cache, reorder = with_beam_table(cache), reorder_beam_tables

    request = Request(gen=None, spec=spec, seed=None, hooks=model._hook_slot, user_processors=user_processors)
    return decode(ops, request, step=step, cache=cache, prompt=prompt,
                  processors=processors, key=None if stream_names is None else ops.streams(stream_names, prng_key),
                  reorder=reorder)


class FlaxGenerationMixin:
    """`generate()` for FlaxBlenderbotForConditionalGeneration."""

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """transformers' `compute_transition_scores`: each generated token's score, [rows, generated] (0 after
        a beam hypothesis' end), from generate()'s `sequences`, `scores` (or its `logits` with
        `normalize_logits=True`) and, for beam search, `beam_indices` (`blenderbot_mb.scoring.transition_scores`)."""
        return jnp.asarray(transition_scores(sequences, scores, beam_indices, normalize_logits))

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, prng_key=None, params=None,
                 **kwargs) -> GenerateOutput:
        """Generate replies; returns GenerateOutput with `.sequences` [batch * num_return_sequences, length].

        Settings: the model's generation_config (from the checkpoint) updated by `generation_config` and
        keyword arguments (num_beams, max_length, max_new_tokens, min_length, do_sample, top_k, ...).
        `seed=` (an int, or one per input; default 0, as the reference) or a `prng_key=` (the root of the rows'
        keys) makes sampling repeatable, each sampled reply from its own stream. `decoder_input_ids=` starts
        the replies from a prompt (one row per input, as in the other backends). Hooks:
        `streamer=`, `stopping_criteria=`, `stop_strings=` (with `tokenizer=`), `max_time=`, run through host
        callbacks; `logits_processor=` takes jittable functions `(input_ids [N, max_length], scores, cur_len)`.
        The loop compiles once per settings, batch size and encoder bucket (inputs padded to a multiple of 32
        tokens, `search.encoder_bucket`); later calls reuse it.
        """
        kwargs.pop("trace", None)  # the reference's eager-debug switch; the loop is always jitted here
        input_ids = generate_inputs(input_ids, kwargs)
        traced = isinstance(input_ids, jax.core.Tracer)
        check_inputs(input_ids, attention_mask, self.config, "input_ids", values=not traced)
        prompt = kwargs.pop("decoder_input_ids", None)
        if prompt is not None:
            concrete = not (traced or isinstance(prompt, jax.core.Tracer))
            check_inputs(prompt, None, self.config, "decoder_input_ids", values=concrete)
            if concrete:  # (inside a caller's jit the prompt is taken as it is)
                prompt = decoder_prompt(generation_config or self.generation_config, self.config, kwargs,
                                        np.asarray(prompt), input_ids.shape[0])[0]
        request = prepare(generation_config or self.generation_config, self.config, kwargs,
                          prompt_length=1 if prompt is None else int(prompt.shape[1]))
        if traced:
            refuse_host_hooks(request, "a jax.jit around generate()")
        if prng_key is not None and request.seed is not None:
            raise ConfigError("pass seed= or prng_key=, not both")
        gen, spec = request.gen, request.spec
        # concrete inputs are prepared on the host (numpy) and go to the device once, as the jitted search's
        # arguments: each eager jax.numpy operation here was a dispatch of its own (~2 ms a call on an H200)
        host = not traced and not isinstance(attention_mask, jax.core.Tracer)
        xp, ops = (np, NumpyOps()) if host else (jnp, JaxOps())
        input_ids = input_ids if traced else np.asarray(input_ids).astype(np.int32, copy=False)
        if attention_mask is None:
            attention_mask = infer_attention_mask(ops, input_ids, gen)
        attention_mask = xp.asarray(attention_mask).astype(xp.int32)
        if host:
            check_rows_attend(attention_mask)
        names = stream_ids(NumpyOps(), spec, 0 if request.seed is None else request.seed, input_ids.shape[0])
        if spec.layer_outputs:
            request.hooks.encoder_width = input_ids.shape[1]  # (the caller's: the bucket's padding is cut off)
        if prompt is None:
            prompt = xp.full((input_ids.shape[0], 1), gen.decoder_start_token_id, xp.int32)
        prompt = xp.asarray(prompt).astype(xp.int32)
        width = input_ids.shape[1]
        input_ids, attention_mask = _bucketed(input_ids, attention_mask, spec, self.config, gen, traced)
        key = (spec, request.user_processors)
        options = _compiler_options()
        cached = (key, options and tuple(sorted(options.items())), BEAM_TABLE)
        fn = self._generate_fns.get(cached)
        if fn is None:
            fn = self._generate_fns[cached] = jax.jit(partial(_run, self, *key), compiler_options=options)
        slot = self._hook_slot
        slot.current, slot.failure = request.hooks, None
        try:
            sequences, length, scores, beams = fn(self.params if params is None else params, input_ids, attention_mask,
                                                  prompt, prng_key, names, np.int32(width))
            if request.hooks is not None:
                jax.effects_barrier()  # every callback of this call has run
        except Exception:
            if slot.failure is not None:  # a hook's own error (a streamer's, a stopping criterion's), not JAX's
                raise slot.failure.with_traceback(slot.failure.__traceback__) from None
            raise
        finally:
            slot.current = None
        if not traced:  # trim to the longest returned sequence, as the reference returns them
            sequences = sequences[:, : int(length)]
        return generate_output(request, sequences, length, scores, beams, trim=not traced)

    @property
    def _hook_slot(self) -> HookSlot:
        return self.__dict__.setdefault("_hook_slot_", HookSlot())
