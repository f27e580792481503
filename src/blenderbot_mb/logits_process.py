"""The logits processors, written once over `ArrayOps` for every backend.

`ResolvedGeneration.processor_plan()` decides which processors run, in which order, with which parameters;
`build_processors` turns that plan into functions with one signature,

    process(tokens [N, L] int32, cur_len, scores [N, V] float32) -> scores

where `tokens[:, :cur_len]` are the decoder tokens so far (start token and prompt included) and the rest of the
fixed-size buffer is padding. They follow transformers' PyTorch processors value for value.
"""

from __future__ import annotations

from functools import partial

import numpy as np

NEG_INF = float("-inf")


def windows(ops, ids, n: int):
    """Every run of n consecutive ids: [N, S] -> n slices [N, S - n + 1] (S may be known only at run time)."""
    count = ops.size(ids, 1) - n + 1
    return [ids[:, i:i + count] for i in range(n)]


def _stack_last(ops, parts):
    return ops.concat([p[..., None] for p in parts], axis=-1)


def _ban(ops, scores, banned):
    return ops.masked_fill(scores, banned, NEG_INF)


def _row(ops, key, make, dtype="bool"):
    """A constant row [1, V] built on the host by `make()`; eager loops build it once per generate() call."""
    if not ops.eager:
        return ops.constant(make()[None, :], dtype)
    rows = ops.__dict__.setdefault("_constant_rows", {})
    if key not in rows:
        rows[key] = ops.constant(make()[None, :], dtype)
    return rows[key]


def sequence_bias(ops, biases, tokens, cur_len, scores):
    """Add each (ids, bias) pair's bias: a one-token sequence's to its token always, a longer one's to its last
    token when the decoder ends with the rest of it (several matches add up). The bias is summed first, then
    added to the scores, as the reference does."""
    vocab = scores.shape[-1]
    singles = tuple((ids[0], bias) for ids, bias in biases if len(ids) == 1)

    def single_row():
        row = np.zeros(vocab, np.float32)
        for token, bias in singles:
            row[token] = bias
        return row

    total = _row(ops, ("bias", singles, vocab), single_row, "float32")
    for ids, bias in biases:
        if len(ids) == 1 or len(ids) - 1 > tokens.shape[1]:
            continue
        *prefix, last = ids
        tail = ops.slice_columns(tokens, cur_len - len(prefix), len(prefix))
        hit = ops.all(tail == ops.constant(prefix, "int32")[None, :], axis=-1)
        hit = ops.select(cur_len >= len(prefix), lambda h=hit: h, lambda h=hit: h & False)
        column = _row(ops, ("last", last, vocab), lambda t=last: np.arange(vocab) == t)
        total = total + ops.where(hit[:, None] & column, float(bias), 0.0)
    return scores + total


def repetition_penalty(ops, penalty, tokens, cur_len, scores):
    seen = ops.mark(tokens, ops.arange(tokens.shape[1])[None, :] < cur_len, scores.shape[-1])
    return ops.where(seen, ops.where(scores < 0, scores * penalty, scores / penalty), scores)


def presence_frequency(ops, presence, frequency, start, tokens, cur_len, scores):
    """OpenAI's (and vLLM's) presence and frequency penalties over the reply so far (the tokens from `start`, the
    end of the decoder prompt, to cur_len): each token's score less frequency x its count, less presence once it
    occurs."""
    column = ops.arange(tokens.shape[1])[None, :]
    counts = ops.count(tokens, (column >= start) & (column < cur_len), scores.shape[-1])
    return scores - counts * frequency - ops.cast(counts > 0, "float32") * presence


def _ngram_bans(ops, grams, prefix, match_ok, vocab):
    """grams [N, W, n]: ban the last id of every gram whose first n-1 ids equal prefix [N, n-1]."""
    match = ops.all(grams[..., :-1] == prefix[:, None, :], axis=-1) & match_ok
    return ops.mark(grams[..., -1], match, vocab)


def no_repeat_ngram(ops, n, tokens, cur_len, scores):
    """No n-gram occurs twice in the decoder tokens."""
    if tokens.shape[1] < n:
        return scores
    grams = _stack_last(ops, windows(ops, tokens, n))
    prefix = ops.slice_columns(tokens, cur_len - (n - 1), n - 1)
    ok = ops.arange(grams.shape[1])[None, :] <= cur_len - n
    banned = _ngram_bans(ops, grams, prefix, ok, scores.shape[-1])
    return ops.select(cur_len + 1 >= n, lambda: _ban(ops, scores, banned), lambda: scores)


def encoder_no_repeat_ngram(ops, n, grams, tokens, cur_len, scores):
    """No n-gram of the encoder input (grams [N, W, n], padding included as in the reference) is repeated."""
    prefix = ops.slice_columns(tokens, cur_len - (n - 1), n - 1)
    ok = ops.full((1, ops.size(grams, 1)), True, "bool")
    banned = _ngram_bans(ops, grams, prefix, ok, scores.shape[-1])
    return ops.select(cur_len >= n - 1, lambda: _ban(ops, scores, banned), lambda: scores)


def bad_words(ops, words, tokens, cur_len, scores):
    """Ban one-token words always, and a longer word's last id when the decoder ends with the rest of it."""
    vocab = scores.shape[-1]
    singles = tuple(w[0] for w in words if len(w) == 1)
    if singles:
        scores = ops.fill_columns(scores, singles, NEG_INF)
    for *prefix, last in (w for w in words if len(w) > 1):
        if len(prefix) > tokens.shape[1]:
            continue
        tail = ops.slice_columns(tokens, cur_len - len(prefix), len(prefix))
        hit = ops.all(tail == ops.constant(prefix, "int32")[None, :], axis=-1)
        hit = ops.select(cur_len >= len(prefix), lambda h=hit: h, lambda h=hit: h & False)
        scores = _ban(ops, scores, hit[:, None] & _row(ops, ("last", last, vocab), lambda t=last: np.arange(vocab) == t))
    return scores


def min_length(ops, length, eos_ids, tokens, cur_len, scores):
    return ops.select(cur_len < length, lambda: ops.fill_columns(scores, eos_ids, NEG_INF), lambda: scores)


def forced_token(ops, token_id, at_length, tokens, cur_len, scores):
    """Only `token_id` may follow when the decoder has `at_length` tokens (forced BOS: 1, EOS: max - 1)."""
    vocab = scores.shape[-1]
    row = _row(ops, ("forced", token_id, vocab), lambda: np.where(np.arange(vocab) == token_id, 0.0, NEG_INF),
               "float32")
    return ops.select(cur_len == at_length, lambda: row + ops.where(scores == scores, 0.0, 0.0), lambda: scores)


def temperature(ops, value, tokens, cur_len, scores):
    return scores / value


def top_k(ops, k, tokens, cur_len, scores):
    threshold = ops.top_k(scores, min(k, scores.shape[-1]))[0][:, -1:]
    return _ban(ops, scores, scores < threshold)


def top_p(ops, p, min_keep, tokens, cur_len, scores):
    """Keep the smallest set of likeliest ids whose probabilities reach p (at least min_keep of them)."""
    ordered, order = ops.sort(scores)  # ascending, as the reference
    remove = ops.cumsum(ops.softmax(ordered)) <= 1 - p
    vocab = scores.shape[-1]
    remove = remove & _row(ops, ("keep", min_keep, vocab), lambda: np.arange(vocab) < vocab - min_keep)
    inverse = ops.sort(order)[1]
    return _ban(ops, scores, ops.take_along(remove, inverse, axis=-1))


def min_p(ops, p, min_keep, tokens, cur_len, scores):
    """Drop the ids less likely than p times the likeliest one (keeping the min_keep likeliest)."""
    probs = ops.softmax(scores)
    remove = probs < p * ops.max(probs, axis=-1, keepdims=True)
    return _ban(ops, scores, remove & ~_likeliest(ops, probs, min_keep))


def _likeliest(ops, scores, k):
    """[N, V] bool: the k highest of each row (ties: the lower id first)."""
    ids = ops.top_k(scores, min(k, scores.shape[-1]))[1]
    return ops.mark(ids, ids >= 0, scores.shape[-1])


def typical_p(ops, mass, min_keep, tokens, cur_len, scores):
    """Locally typical sampling: keep the ids whose surprisal is closest to the entropy, up to `mass`."""
    normalized = ops.log_softmax(scores)
    p = ops.softmax(scores)
    entropy = -ops.sum(ops.where(p > 0, normalized, 0.0) * p, axis=-1, keepdims=True)  # as nansum: 0 * -inf left out
    shifted = ops.where(-normalized - entropy < 0, entropy + normalized, -normalized - entropy)
    ordered, order = ops.sort(shifted)
    cumulative = ops.cumsum(ops.softmax(ops.take_along(scores, order, axis=-1)))
    vocab = scores.shape[-1]
    last = ops.sum(ops.cast(cumulative < mass, "int32"), axis=-1, keepdims=True)
    last = ops.where(last > vocab - 1, vocab - 1, last)
    remove = ordered > ops.take_along(ordered, last, axis=-1)
    remove = remove & _row(ops, ("first", min_keep, vocab), lambda: np.arange(vocab) >= min_keep)
    inverse = ops.sort(order)[1]
    return _ban(ops, scores, ops.take_along(remove, inverse, axis=-1))


def epsilon_cutoff(ops, epsilon, min_keep, tokens, cur_len, scores):
    """Drop the ids whose probability is below epsilon (keeping the min_keep likeliest)."""
    return _cut_below(ops, scores, ops.softmax(scores) < epsilon, min_keep)


def eta_cutoff(ops, epsilon, min_keep, tokens, cur_len, scores):
    """Drop the ids whose probability is below min(epsilon, sqrt(epsilon) * exp(-entropy))."""
    probs = ops.softmax(scores)
    logits = ops.log_softmax(scores)
    finite = ops.where(logits < np.finfo(np.float32).min, float(np.finfo(np.float32).min), logits)
    entropy = -ops.sum(finite * probs, axis=-1, keepdims=True)
    epsilon = np.float32(epsilon)  # the reference's float32 tensor, its square root in float32
    eta = ops.exp(-entropy) * float(np.sqrt(epsilon))
    eta = ops.where(eta > float(epsilon), float(epsilon), eta)
    return _cut_below(ops, scores, probs < eta, min_keep)


def _cut_below(ops, scores, remove, min_keep):
    threshold = ops.top_k(scores, min(min_keep, scores.shape[-1]))[0][:, -1:]
    return _ban(ops, scores, remove & (scores < threshold))


def exponential_decay(ops, growth, eos_ids, tokens, cur_len, scores):
    """Raise the eos scores exponentially once the reply is long: eos score + |eos score| x growth[cur_len], where
    growth[k] = decay_factor ** (k - start) - 1 past the start, else 0 (a host table, float32 as the reference's
    Python number meets its scores); eos scores that are not finite are left as they are."""
    vocab = scores.shape[-1]
    eos = _row(ops, ("eos", eos_ids, vocab), lambda: np.isin(np.arange(vocab), eos_ids))
    factor = ops.reshape(ops.column(ops.constant(np.asarray(growth, np.float32)[None, :], "float32"), cur_len), (1, 1))
    grows = eos & (scores == scores) & (scores < float("inf")) & (scores > NEG_INF)
    size = ops.where(grows, ops.where(scores < 0, -scores, scores), 0.0)
    return scores + size * factor


def suppress_tokens(ops, ids, at_length, tokens, cur_len, scores):
    """Ban `ids` always (at_length None), or only when the decoder has `at_length` tokens (the first reply
    token: begin_suppress_tokens)."""
    if at_length is None:
        return ops.fill_columns(scores, ids, NEG_INF)
    return ops.select(cur_len == at_length, lambda: ops.fill_columns(scores, ids, NEG_INF), lambda: scores)


def renormalize(ops, tokens, cur_len, scores):
    return ops.log_softmax(scores)


BUILTIN = {
    "sequence_bias": sequence_bias,
    "repetition_penalty": repetition_penalty,
    "presence_frequency": presence_frequency,
    "no_repeat_ngram": no_repeat_ngram,
    "bad_words": bad_words,
    "min_length": min_length,
    "forced_bos": forced_token,
    "forced_eos": forced_token,
    "temperature": temperature,
    "top_k": top_k,
    "top_p": top_p,
    "min_p": min_p,
    "typical_p": typical_p,
    "epsilon_cutoff": epsilon_cutoff,
    "eta_cutoff": eta_cutoff,
    "exponential_decay_length_penalty": exponential_decay,
    "suppress_tokens": suppress_tokens,
    "begin_suppress_tokens": suppress_tokens,
    "renormalize_logits": renormalize,
}
# transformers runs a caller's logits_processor after its own processors but before these (the sampling
# warpers, then the renormalization, which is last of all)
AFTER_CALLERS = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                           "renormalize_logits"})


def build_processors(ops, plan, encoder_grams=None) -> list:
    """The processors of `plan` (a `processor_plan()`), bound to `ops`. `encoder_grams` ([N, W, n] n-grams of
    the encoder input, one row per hypothesis) feeds encoder_no_repeat_ngram; None drops it (no encoder, or an
    input shorter than n)."""
    out = []
    for spec in plan:
        if spec.name == "encoder_no_repeat_ngram":
            if encoder_grams is not None:
                out.append(partial(encoder_no_repeat_ngram, ops, *spec.params, encoder_grams))
        else:
            out.append(partial(BUILTIN[spec.name], ops, *spec.params))
            out[-1].after_callers = spec.name in AFTER_CALLERS
    return out


def with_callers(processors: list, callers: list) -> list:
    """The built-in `processors` (build_processors') with a caller's processors where transformers puts them:
    after the built-in processors, before the sampling warpers and the renormalization."""
    at = next((i for i, fn in enumerate(processors) if getattr(fn, "after_callers", False)), len(processors))
    return [*processors[:at], *callers, *processors[at:]]


def encoder_ngram_size(plan) -> int:
    """n of the plan's encoder_no_repeat_ngram (0: none)."""
    return next((spec.params[0] for spec in plan if spec.name == "encoder_no_repeat_ngram"), 0)


def encoder_ngrams(ops, plan, input_ids, copies: int):
    """The [N * copies, W, n] n-grams of the encoder input that encoder_no_repeat_ngram needs, or None."""
    n = encoder_ngram_size(plan)
    if n == 0 or (input_ids.shape[1] is not None and input_ids.shape[1] < n):
        return None
    grams = _stack_last(ops, windows(ops, input_ids, n))
    return ops.repeat(grams, copies, axis=0) if copies > 1 else grams
