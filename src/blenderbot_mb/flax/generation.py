"""generate() for the Flax backend: greedy, sampling and beam search, each one `lax.while_loop` under jax.jit.

Settings come from `GenerationConfig.resolve` (core). The decoder cache is preallocated for
`max_length` positions; every step writes one position, so the loop body has fixed shapes and the
whole generation compiles once per (settings, input shape). The logits processors are small pure
functions over the fixed-size token buffer and the current length; which ones run, in which order and
with which parameters is the core's `processor_plan()` (part of the compile key). All of them, ngram
blocking included, work jitted. Beam search follows transformers' vectorized beam search rule for rule, so the tokens match.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import validation
from ..errors import InputError
from ..outputs import GenerateOutput

NEG_INF = -float("inf")


@dataclass(frozen=True)
class _Settings:
    """Everything that shapes the compiled loop (hashable: the key of the compile cache)."""

    mode: str
    max_length: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    decoder_start_token_id: int
    eos_token_ids: tuple
    pad_token_id: int | None
    processors: tuple  # the core's ProcessorSpec plan

    @classmethod
    def from_resolved(cls, r) -> _Settings:
        return cls(r.mode, r.max_length, r.num_beams, r.num_return_sequences, float(r.length_penalty),
                   r.early_stopping, r.decoder_start_token_id, r.eos_token_ids, r.pad_token_id, r.processor_plan())


# ---------------------------------------------------------------------- logits processors
# Each takes (tokens [N, L] buffer, cur_len = number of valid tokens, scores [N, V]) and returns scores.
def _seen_mask(tokens, valid, vocab_size):
    """[N, V] bool: which ids occur at the valid positions of each row."""
    n = tokens.shape[0]
    ids = jnp.where(valid, jnp.minimum(tokens, vocab_size), vocab_size)
    return jnp.zeros((n, vocab_size + 1), bool).at[jnp.arange(n)[:, None], ids].set(True)[:, :vocab_size]


def repetition_penalty(penalty, tokens, cur_len, scores):
    seen = _seen_mask(tokens, jnp.arange(tokens.shape[1])[None, :] < cur_len, scores.shape[-1])
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _windows(seq, n):
    """[N, S] -> [N, S - n + 1, n]: every run of n consecutive ids."""
    count = seq.shape[1] - n + 1
    return jnp.stack([seq[:, i:i + count] for i in range(n)], axis=-1)


def no_repeat_ngram(n, tokens, cur_len, scores):
    """Ban every token that would complete an n-gram already present in the row's own tokens."""
    windows = _windows(tokens, n)  # [N, W, n]
    prefix = lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
    starts = jnp.arange(windows.shape[1])
    match = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1) & (starts[None, :] <= cur_len - n)
    match = match & (cur_len >= n)
    return _ban(scores, windows[..., -1], match)


def encoder_no_repeat_ngram(n, encoder_windows, tokens, cur_len, scores):
    """Ban tokens that would repeat an n-gram of the encoder input ([N, W, n] windows, one row per hypothesis)."""
    prefix = lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)
    match = jnp.all(encoder_windows[..., :-1] == prefix[:, None, :], axis=-1) & (cur_len >= n - 1)
    return _ban(scores, encoder_windows[..., -1], match)


def _ban(scores, candidates, match):
    n, v = scores.shape
    ids = jnp.where(match, jnp.minimum(candidates, v), v)
    banned = jnp.zeros((n, v + 1), bool).at[jnp.arange(n)[:, None], ids].set(True)[:, :v]
    return jnp.where(banned, NEG_INF, scores)


def bad_words(bad_words_ids, tokens, cur_len, scores):
    for seq in bad_words_ids:
        *prefix, last = seq
        if not prefix:
            scores = scores.at[:, last].set(NEG_INF)
            continue
        p = len(prefix)
        if p > tokens.shape[1]:
            continue
        tail = lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur_len - p, 0), p, axis=1)
        hit = jnp.all(tail == jnp.array(prefix, tokens.dtype)[None, :], axis=-1) & (cur_len >= p)
        scores = scores.at[:, last].set(jnp.where(hit, NEG_INF, scores[:, last]))
    return scores


def min_length(length, eos_ids, tokens, cur_len, scores):
    eos = jnp.array(eos_ids)
    return scores.at[:, eos].set(jnp.where(cur_len < length, NEG_INF, scores[:, eos]))


def force_token(token_id, at_len, tokens, cur_len, scores):
    forced = jnp.full_like(scores, NEG_INF).at[:, token_id].set(0.0)
    return jnp.where(cur_len == at_len, forced, scores)


def temperature(t, tokens, cur_len, scores):
    return scores / t


def top_k(k, tokens, cur_len, scores):
    k = min(k, scores.shape[-1])
    threshold = lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < threshold, NEG_INF, scores)


def top_p(p, min_keep, tokens, cur_len, scores):
    order = jnp.argsort(scores, axis=-1)  # ascending, as the reference
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove = cumulative <= 1 - p
    remove = remove.at[:, -min_keep:].set(False)
    n = scores.shape[0]
    remove = jnp.zeros_like(remove).at[jnp.arange(n)[:, None], order].set(remove)
    return jnp.where(remove, NEG_INF, scores)


PROCESSORS = {
    "repetition_penalty": repetition_penalty,
    "no_repeat_ngram": no_repeat_ngram,
    "encoder_no_repeat_ngram": encoder_no_repeat_ngram,
    "bad_words": bad_words,
    "min_length": min_length,
    "forced_bos": force_token,
    "forced_eos": force_token,
    "temperature": temperature,
    "top_k": top_k,
    "top_p": top_p,
}


def logits_processors(s: _Settings, encoder_windows=None):
    """The processors of the core's plan `s.processors`, as fn(tokens, cur_len, scores)."""
    fns = []
    for spec in s.processors:
        if spec.name == "encoder_no_repeat_ngram":
            if encoder_windows is not None:  # None: the encoder input is shorter than n
                fns.append(partial(encoder_no_repeat_ngram, *spec.params, encoder_windows))
        else:
            fns.append(partial(PROCESSORS[spec.name], *spec.params))
    return fns


def _apply(fns, tokens, cur_len, scores):
    for fn in fns:
        scores = fn(tokens, cur_len, scores)
    return scores


# ---------------------------------------------------------------------- the loops
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


def _decode_step(model, params, cache, cross_kv, token, cur_len, encoder_hidden_states, encoder_attention_mask):
    """Logits [N, V] (float32) for one new token per row at position cur_len - 1, and the updated cache.

    `cross_kv` (from `_cross_kv`, loop-invariant) holds the cross-attention keys/values, so the step only
    projects the new token's queries against them.
    """
    n = token.shape[0]
    positions = jnp.full((n, 1), cur_len - 1, jnp.int32)
    out, updated = model.module.apply(
        {"params": params, "cache": cache, "cross_kv": cross_kv}, token[:, None], None, positions,
        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
        mutable=["cache"], method="decode_logits")
    return out.logits[:, -1].astype(jnp.float32), updated["cache"]


def _is_eos(ids, eos_ids):
    if not eos_ids:
        return jnp.zeros(ids.shape, bool)
    return jnp.isin(ids, jnp.array(eos_ids))


def _greedy_or_sample(model, s: _Settings, params, enc, mask, cross_kv, procs, prng_key):
    n = enc.shape[0]
    length = s.max_length
    pad = s.pad_token_id if s.pad_token_id is not None else 0
    tokens = jnp.full((n, length), pad, jnp.int32).at[:, 0].set(s.decoder_start_token_id)
    cache = model.init_cache(n, length)

    def cond(state):
        tokens, cur_len, unfinished, cache, key = state
        return (cur_len < length) & jnp.any(unfinished)

    def body(state):
        tokens, cur_len, unfinished, cache, key = state
        last = lax.dynamic_index_in_dim(tokens, cur_len - 1, axis=1, keepdims=False)
        logits, cache = _decode_step(model, params, cache, cross_kv, last, cur_len, enc, mask)
        scores = _apply(procs, tokens, cur_len, logits)
        if s.mode == "sample":
            key, sub = jax.random.split(key)
            next_ids = jax.random.categorical(sub, scores, axis=-1).astype(jnp.int32)
        else:
            next_ids = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        next_ids = jnp.where(unfinished, next_ids, pad)
        tokens = lax.dynamic_update_slice(tokens, next_ids[:, None], (0, cur_len))
        unfinished = unfinished & ~_is_eos(next_ids, s.eos_token_ids)
        return tokens, cur_len + 1, unfinished, cache, key

    state = (tokens, jnp.array(1, jnp.int32), jnp.ones((n,), bool), cache, prng_key)
    tokens, cur_len, *_ = lax.while_loop(cond, body, state)
    return tokens, cur_len, None


def _gather(x, idx):
    """x [B, K, ...], idx [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(model, s: _Settings, params, enc, mask, cross_kv, procs, prng_key):
    """transformers' vectorized beam search: 2K candidates a step, running and finished beams kept apart."""
    k = s.num_beams
    n = enc.shape[0]
    b = n // k
    length = s.max_length
    keep = max(2, 1 + len(s.eos_token_ids)) * k
    top_mask = jnp.arange(keep) < k
    # the reference pads finished beams with `pad_token_id or eos_token_id` (so eos when pad is 0)
    # finished beams are padded with pad (the v4.37 reference; transformers 5 writes eos when pad is 0)
    fill = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_ids[0] if s.eos_token_ids else -1)
    running = jnp.full((b, k, length), fill, jnp.int32).at[:, :, 0].set(s.decoder_start_token_id)
    running_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-1e9)
    state = dict(
        running=running, running_scores=running_scores, sequences=running, scores=jnp.full((b, k), -1e9),
        lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
        unsatisfied=jnp.ones((b, 1), bool), done=jnp.array(False), cur_len=jnp.array(1, jnp.int32),
        cache=model.init_cache(n, length), key=prng_key)
    eos = s.eos_token_ids
    lp = s.length_penalty

    def body(st):
        cur_len = st["cur_len"]
        flat = st["running"].reshape(n, length)
        last = lax.dynamic_index_in_dim(flat, cur_len - 1, axis=1, keepdims=False)
        logits, cache = _decode_step(model, params, st["cache"], cross_kv, last, cur_len, enc, mask)
        log_probs = _apply(procs, flat, cur_len, jax.nn.log_softmax(logits, axis=-1))
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.reshape(b, k, vocab) + st["running_scores"][:, :, None]).reshape(b, k * vocab)
        key = st["key"]
        if s.mode == "beam_sample":  # sampling without replacement: Gumbel top-k, then sorted by score
            key, sub = jax.random.split(key)
            gumbel = jax.random.gumbel(sub, log_probs.shape)
            idx = lax.top_k(log_probs + gumbel, keep)[1]
            vals = jnp.take_along_axis(log_probs, idx, axis=-1)
            order = jnp.argsort(-vals, axis=-1, stable=True)
            topk_scores, topk_idx = jnp.take_along_axis(vals, order, -1), jnp.take_along_axis(idx, order, -1)
        else:
            topk_scores, topk_idx = lax.top_k(log_probs, keep)
        parent, ids = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
        topk_seqs = _gather(st["running"], parent)
        topk_seqs = lax.dynamic_update_slice(topk_seqs, ids[:, :, None], (0, 0, cur_len))
        hits = _is_eos(ids, eos) | (cur_len + 1 >= length)

        # beams that go on: the best K candidates that did not stop
        running_candidates = topk_scores + hits.astype(jnp.float32) * -1.0e9
        next_idx = lax.top_k(running_candidates, k)[1]
        running = _gather(topk_seqs, next_idx)
        running_scores = _gather(running_candidates, next_idx)
        beam_idx = (_gather(parent, next_idx) + jnp.arange(b)[:, None] * k).reshape(n)

        # finished hypotheses: merge the candidates that stopped among the top K with the kept ones
        just_finished = hits & top_mask[None, :]
        candidate = topk_scores / (cur_len.astype(jnp.float32) ** lp)
        full = jnp.all(st["finished"], axis=-1, keepdims=True) & (s.early_stopping is True)
        candidate = candidate + full * -1.0e9 + (~st["unsatisfied"]) * -1.0e9 + (~just_finished) * -1.0e9
        merged_scores = jnp.concatenate([st["scores"], candidate], axis=1)
        best = lax.top_k(merged_scores, k)[1]
        sequences = _gather(jnp.concatenate([st["sequences"], topk_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        lengths = _gather(jnp.concatenate([st["lengths"], jnp.full((b, keep), cur_len + 1)], axis=1), best)
        finished = _gather(jnp.concatenate([st["finished"], just_finished], axis=1), best)

        cache = jax.tree_util.tree_map(lambda x: x[beam_idx] if x.ndim > 0 else x, cache)
        cur_len = cur_len + 1
        # can a running beam still beat the worst finished one?
        if s.early_stopping == "never" and lp > 0.0:
            best_len = jnp.float32(length - 1)
        else:
            best_len = (cur_len - 1).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_len**lp
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1.0e9)
        unsatisfied = st["unsatisfied"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        open_beam = ~(jnp.all(finished) & (s.early_stopping is True))
        done = ~(jnp.any(unsatisfied) & open_beam & ~jnp.all(hits))
        return dict(running=running, running_scores=running_scores, sequences=sequences, scores=scores,
                    lengths=lengths, finished=finished, unsatisfied=unsatisfied, done=done, cur_len=cur_len,
                    cache=cache, key=key)

    st = lax.while_loop(lambda st: ~st["done"] & (st["cur_len"] < length), body, state)
    r = s.num_return_sequences
    sequences = st["sequences"][:, :r].reshape(b * r, length)
    out_len = jnp.max(st["lengths"][:, :r])
    return sequences, out_len, st["scores"][:, :r].reshape(b * r)


def _run(model, s: _Settings, params, input_ids, attention_mask, prng_key):
    enc = model.module.apply({"params": params}, input_ids, attention_mask,
                             jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape),
                             method=lambda m, *a: m._get_encoder_module()(*a)).last_hidden_state
    cross_kv = _cross_kv(model, params, enc, attention_mask)
    k = s.num_beams
    if k > 1:  # one row per hypothesis (the cross K/V projected for the batch, then repeated)
        enc, attention_mask = jnp.repeat(enc, k, axis=0), jnp.repeat(attention_mask, k, axis=0)
        cross_kv = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), cross_kv)
    windows = None
    n = next((spec.params[0] for spec in s.processors if spec.name == "encoder_no_repeat_ngram"), 0)
    if n > 0 and input_ids.shape[1] >= n:
        windows = jnp.repeat(_windows(input_ids, n), k, axis=0)
    procs = logits_processors(s, windows)
    loop = _beam_search if s.mode in ("beam_search", "beam_sample") else _greedy_or_sample
    return loop(model, s, params, enc, attention_mask, cross_kv, procs, prng_key)


class FlaxGenerationMixin:
    """`generate()` for FlaxBlenderbotForConditionalGeneration."""

    def generate(self, input_ids, attention_mask=None, generation_config=None, prng_key=None, params=None,
                 **kwargs) -> GenerateOutput:
        """Generate replies; returns GenerateOutput with `.sequences` [batch * num_return_sequences, length].

        Settings: the model's generation_config (from the checkpoint) updated by `generation_config` and
        keyword arguments (num_beams, max_length, max_new_tokens, min_length, do_sample, top_k, ...).
        The loop compiles once per settings and input shape; later calls reuse it.
        """
        kwargs.pop("trace", None)  # the reference's eager-debug switch; the loop is always jitted here
        resolved = (generation_config or self.generation_config).resolve(self.config, **kwargs)
        s = _Settings.from_resolved(resolved)
        if s.mode in ("beam_search", "beam_sample") and s.num_return_sequences > s.num_beams:
            raise InputError(f"num_return_sequences ({s.num_return_sequences}) cannot exceed num_beams ({s.num_beams})")
        if s.mode == "greedy" and s.num_return_sequences > 1:
            raise InputError("num_return_sequences > 1 needs beam search (num_beams > 1) or do_sample=True")
        traced = isinstance(input_ids, jax.core.Tracer)
        validation.check_model_inputs(input_ids, attention_mask, self.config, values=not traced)
        input_ids = input_ids if traced else jnp.asarray(np.asarray(input_ids), jnp.int32)
        self._check_ids(input_ids, "input_ids")
        if attention_mask is None:
            pad, eos = s.pad_token_id, s.eos_token_ids
            if pad is not None and pad not in eos:  # the reference's default: mask the pad tokens
                attention_mask = (input_ids != pad).astype(jnp.int32)
            else:
                attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        if s.mode == "sample" and s.num_return_sequences > 1:
            input_ids = jnp.repeat(input_ids, s.num_return_sequences, axis=0)
            attention_mask = jnp.repeat(attention_mask, s.num_return_sequences, axis=0)
        if prng_key is None:
            prng_key = jax.random.PRNGKey(0)
        fn = self._generate_fns.get(s)
        if fn is None:
            fn = self._generate_fns[s] = jax.jit(partial(_run, self, s))
        sequences, length, scores = fn(self.params if params is None else params, input_ids, attention_mask,
                                       prng_key)
        if not traced:  # trim to the longest returned sequence, as the reference returns them
            sequences = sequences[:, : int(length)]
        return GenerateOutput(sequences=sequences, sequences_scores=scores)
