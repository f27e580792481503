"""`generate()` for the TensorFlow backend: greedy, sampling and beam search, compilable with XLA.

Everything that depends on the settings is decided in Python once (the logits processors, from the core's
`processor_plan()`; the decoding strategy); the decoding itself is one `tf.while_loop` over fixed shapes:
token buffers of `max_length`, and a self-attention cache preallocated to `max_length` and written at the step's index. So
`tf.function(model.generate, jit_compile=True)` compiles the whole loop, n-gram blocking included.

Semantics follow transformers' PyTorch `generate` (the order of the logits processors, the vectorised beam
search with its length penalty and early-stopping heuristic, padding of finished sequences), so greedy and
beam search return the same tokens. In eager mode the result is trimmed to the generated length like the
reference; inside `tf.function` it keeps the static `max_length` width, padded.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import tensorflow as tf

from .. import validation
from ..errors import InputError, check_input_ids_range, check_sequence_length
from ..outputs import GenerateOutput

NEG_INF = float("-inf")


# ---------------------------------------------------------------------- logits processors
# Each processor maps (scores (N, V) float32, sequences (N, L) int32, cur_len scalar) -> scores, where
# sequences[:, :cur_len] are the decoder tokens so far (start token included).
def _ban(scores, banned):
    return tf.where(banned, tf.constant(NEG_INF, scores.dtype), scores)


def _presence(sequences, cur_len, vocab_size):
    """(N, V) bool: which ids occur in sequences[:, :cur_len]."""
    valid = tf.range(tf.shape(sequences)[1])[None, :] < cur_len
    hot = tf.one_hot(sequences, vocab_size, dtype=tf.float32) * tf.cast(valid, tf.float32)[:, :, None]
    return tf.reduce_max(hot, axis=1) > 0


def repetition_penalty(penalty: float):
    def process(scores, sequences, cur_len):
        seen = _presence(sequences, cur_len, scores.shape[-1])
        return tf.where(seen, tf.where(scores < 0, scores * penalty, scores / penalty), scores)
    return process


def _ngram_bans(windows, window_ok, prefix, vocab_size):
    """Ban the last token of every window whose first n-1 tokens equal `prefix`.

    windows (N, W, n), window_ok (N or 1, W) bool, prefix (N, n-1) -> banned (N, V) bool.
    """
    match = tf.reduce_all(windows[:, :, :-1] == prefix[:, None, :], axis=-1) & window_ok
    hot = tf.one_hot(windows[:, :, -1], vocab_size, dtype=tf.float32) * tf.cast(match, tf.float32)[:, :, None]
    return tf.reduce_max(hot, axis=1) > 0


def _windows(ids, n):
    """All length-n windows of ids (N, S) -> (N, S-n+1, n)."""
    length = tf.shape(ids)[1]
    return tf.stack([ids[:, k:length - n + 1 + k] for k in range(n)], axis=-1)


def _last_tokens(sequences, cur_len, count):
    index = tf.maximum(cur_len - count + tf.range(count), 0)
    return tf.gather(sequences, index, axis=1)


def no_repeat_ngram(n: int):
    """No n-gram occurs twice in the decoder tokens (start token included, as in the reference)."""
    def process(scores, sequences, cur_len):
        if sequences.shape[1] < n:
            return scores
        windows = _windows(sequences, n)
        ok = (tf.range(tf.shape(windows)[1]) <= cur_len - n)[None, :]
        banned = _ngram_bans(windows, ok, _last_tokens(sequences, cur_len, n - 1), scores.shape[-1])
        return _ban(scores, banned & (cur_len + 1 >= n))
    return process


def encoder_no_repeat_ngram(n: int, encoder_ids):
    """No n-gram of the encoder input (padding included, as in the reference) is repeated by the decoder."""
    windows = _windows(encoder_ids, n)

    def process(scores, sequences, cur_len):
        ok = tf.ones((1, tf.shape(windows)[1]), tf.bool)
        banned = _ngram_bans(windows, ok, _last_tokens(sequences, cur_len, n - 1), scores.shape[-1])
        return _ban(scores, banned & (cur_len >= n - 1))
    return process


def bad_words(words, vocab_size):
    """Ban single-token words always, and a longer word's last token when the decoder ends with the rest."""
    single = [w[0] for w in words if len(w) == 1]
    always = tf.constant([i in set(single) for i in range(vocab_size)])[None, :]
    multi = [w for w in words if len(w) > 1]

    def process(scores, sequences, cur_len):
        banned = tf.broadcast_to(always, tf.shape(scores))
        for w in multi:
            prefix_ok = tf.reduce_all(_last_tokens(sequences, cur_len, len(w) - 1) == tf.constant(w[:-1]), axis=-1)
            prefix_ok &= cur_len >= len(w) - 1
            banned |= prefix_ok[:, None] & (tf.range(vocab_size) == w[-1])[None, :]
        return _ban(scores, banned)
    return process


def min_length(length: int, eos_token_ids):
    def process(scores, sequences, cur_len):
        is_eos = tf.reduce_any(tf.range(scores.shape[-1])[:, None] == tf.constant(eos_token_ids)[None, :], axis=-1)
        return _ban(scores, (cur_len < length) & is_eos[None, :])
    return process


def forced_token(token_id: int, at_length):
    """Only `token_id` is allowed when the decoder length is `at_length` (forced BOS: 1, forced EOS: max - 1)."""
    def process(scores, sequences, cur_len):
        others = (tf.range(scores.shape[-1]) != token_id)[None, :]
        forced = tf.where(others, tf.constant(NEG_INF, scores.dtype), tf.zeros_like(scores))
        return tf.where(tf.equal(cur_len, at_length), forced, scores)
    return process


def temperature(value: float):
    return lambda scores, sequences, cur_len: scores / value


def top_k(k: int):
    def process(scores, sequences, cur_len):
        threshold = tf.math.top_k(scores, min(k, scores.shape[-1])).values[:, -1:]
        return _ban(scores, scores < threshold)
    return process


def top_p(p: float, min_tokens_to_keep: int = 1):
    def process(scores, sequences, cur_len):
        ordered, order = tf.math.top_k(scores, scores.shape[-1])  # descending
        probs = tf.nn.softmax(ordered, axis=-1)
        before = tf.cumsum(probs, axis=-1, exclusive=True)  # mass strictly above each token
        remove = (before >= p) & (tf.range(scores.shape[-1]) >= min_tokens_to_keep)[None, :]
        remove = tf.gather(remove, tf.argsort(order, axis=-1), batch_dims=1)
        return _ban(scores, remove)
    return process


def logits_processors(s, encoder_ids, vocab_size) -> list:
    """The processors of `s.processor_plan()` (core: which ones, in which order, with which parameters)."""
    build = {
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram": no_repeat_ngram,
        "encoder_no_repeat_ngram": lambda n: encoder_no_repeat_ngram(n, encoder_ids),
        "bad_words": lambda words: bad_words(words, vocab_size),
        "min_length": min_length,
        "forced_bos": forced_token,
        "forced_eos": forced_token,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
    }
    return [build[spec.name](*spec.params) for spec in s.processor_plan()
            if spec.name != "encoder_no_repeat_ngram" or encoder_ids is not None]


def _apply(procs, scores, sequences, cur_len):
    for proc in procs:
        scores = proc(scores, sequences, cur_len)
    return scores


def _set_column(buffer, index, values):
    """buffer[..., index] = values, with static shapes."""
    return tf.where(tf.range(buffer.shape[-1]) == index, values[..., None], buffer)


def _length_penalty(length, penalty: float):
    """length ** penalty as the reference computes it (in double precision, then float32)."""
    return tf.cast(tf.pow(tf.cast(length, tf.float64), float(penalty)), tf.float32)


# ---------------------------------------------------------------------- the mixin
class TFGenerationMixin:
    """`generate()` for the Keras encoder-decoder models (needs `model.model.encoder/decoder` and `lm_logits`)."""

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, seed: int | None = None,
                 **kwargs):
        """Reply ids for `input_ids` (batch, src_len): greedy, sampling or beam search by the settings.

        Settings are those of `self.generation_config` (the checkpoint's), overridden by `generation_config` and
        keyword arguments (num_beams, max_length, max_new_tokens, min_length, no_repeat_ngram_size, ...).
        `seed` makes sampling reproducible. Returns (batch * num_return_sequences, length) int32 ids, or a
        GenerateOutput with `return_dict_in_generate=True`.
        """
        if isinstance(input_ids, Mapping):
            kwargs = {**{k: v for k, v in input_ids.items() if k not in ("input_ids", "attention_mask")}, **kwargs}
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if input_ids is None:
            raise InputError("generate() needs input_ids (the encoder input)")
        s = (generation_config or self.generation_config).resolve(self.config, **kwargs)
        validation.check_model_inputs(input_ids, attention_mask, self.config, values=tf.executing_eagerly())
        input_ids = tf.cast(tf.convert_to_tensor(input_ids), tf.int32)
        if input_ids.shape.rank != 2:
            raise InputError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] is not None:
            check_sequence_length(int(input_ids.shape[1]), self.config.max_position_embeddings)
        if tf.executing_eagerly():
            check_input_ids_range(int(tf.reduce_max(input_ids)), int(tf.reduce_min(input_ids)), self.config.vocab_size)
        if attention_mask is None:
            if s.pad_token_id is not None and s.pad_token_id != s.eos_token_id:
                attention_mask = tf.cast(input_ids != s.pad_token_id, tf.int32)
            else:
                attention_mask = tf.ones_like(input_ids)
        attention_mask = tf.cast(tf.convert_to_tensor(attention_mask), tf.int32)

        encoder = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask)
        expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
        encoder_hidden = tf.repeat(encoder.last_hidden_state, expand, axis=0)
        encoder_mask = tf.repeat(attention_mask, expand, axis=0)
        encoder_ids = tf.repeat(input_ids, expand, axis=0)
        if seed is None:
            seed = random.randrange(2**31)
        procs = logits_processors(s, encoder_ids, self.config.vocab_size)
        cache = self._init_generation_cache(encoder_hidden, s.max_length)
        if s.num_beams > 1:
            sequences, length, scores = self._beam_search(s, procs, cache, encoder_hidden, encoder_mask,
                                                          tf.shape(input_ids)[0], seed)
        else:
            sequences, length = self._greedy_or_sample(s, procs, cache, encoder_hidden, encoder_mask, seed)
            scores = None
        if tf.executing_eagerly():
            sequences = sequences[:, : int(length)]
        if s.return_dict_in_generate:
            return GenerateOutput(sequences=sequences, sequences_scores=scores if s.output_scores else None)
        return sequences

    # ------------------------------------------------------------------ one decoder step on the fixed cache
    def _init_generation_cache(self, encoder_hidden, max_length):
        """Per decoder layer: self-k, self-v (zeros, max_length long) and the cross-attention k, v."""
        cache = []
        n = tf.shape(encoder_hidden)[0]
        for layer in self.model.decoder.layers:
            attn = layer.encoder_attn
            empty = tf.zeros((n, attn.num_heads, max_length, attn.head_dim), encoder_hidden.dtype)
            cross_k = attn._heads(attn.k_proj(encoder_hidden))
            cross_v = attn._heads(attn.v_proj(encoder_hidden))
            cache.append((empty, empty, cross_k, cross_v))
        return tuple(cache)

    def _step(self, tokens, index, cache, encoder_hidden, encoder_mask):
        """Logits (N, V) float32 for the next token after `tokens` (N,) at position `index`; the new cache."""
        decoder = self.model.decoder
        embeds = decoder.embed_tokens(tokens[:, None]) * decoder.embed_scale
        out = decoder(inputs_embeds=embeds, position_ids=index + tf.range(1), encoder_hidden_states=encoder_hidden,
                      encoder_attention_mask=encoder_mask, past_key_values=cache, cache_index=index, use_cache=True)
        return tf.cast(self.lm_logits(out.last_hidden_state)[:, -1, :], tf.float32), out.past_key_values

    # ------------------------------------------------------------------ greedy and sampling
    def _greedy_or_sample(self, s, procs, cache, encoder_hidden, encoder_mask, seed):
        n, length = tf.shape(encoder_hidden)[0], s.max_length
        pad = s.pad_token_id if s.pad_token_id is not None else 0
        sequences = tf.fill((n, length), tf.constant(pad, tf.int32))
        sequences = _set_column(sequences, 0, tf.fill((n,), tf.constant(s.decoder_start_token_id, tf.int32)))
        unfinished = tf.ones((n,), tf.bool)

        def cond(cur_len, sequences, unfinished, cache):
            return (cur_len < length) & tf.reduce_any(unfinished)

        def body(cur_len, sequences, unfinished, cache):
            tokens = tf.gather(sequences, cur_len - 1, axis=1)
            logits, cache = self._step(tokens, cur_len - 1, cache, encoder_hidden, encoder_mask)
            scores = _apply(procs, logits, sequences, cur_len)
            if s.do_sample:
                step_seed = tf.stack([tf.constant(seed, tf.int32), cur_len])
                nxt = tf.cast(tf.random.stateless_categorical(scores, 1, step_seed)[:, 0], tf.int32)
            else:
                nxt = tf.argmax(scores, axis=-1, output_type=tf.int32)
            nxt = tf.where(unfinished, nxt, pad)
            sequences = _set_column(sequences, cur_len, nxt)
            if s.eos_token_id is not None:
                unfinished &= nxt != s.eos_token_id
            return cur_len + 1, sequences, unfinished, cache

        cur_len, sequences, _, _ = tf.while_loop(cond, body, (tf.constant(1), sequences, unfinished, cache))
        return sequences, cur_len

    # ------------------------------------------------------------------ beam search
    def _beam_search(self, s, procs, cache, encoder_hidden, encoder_mask, batch, seed):
        """transformers' vectorised beam search: keep 2 * num_beams candidates per step, move those that end
        (eos or max length) among the top num_beams into the finished set, scored by sum_logprobs / len**penalty."""
        k, length, vocab = s.num_beams, s.max_length, self.config.vocab_size
        keep, lp, early = 2 * k, s.length_penalty, s.early_stopping
        prompt = 1
        eos = s.eos_token_id
        # finished beams are padded with pad (the v4.37 reference; transformers 5 writes eos when pad is 0)
        fill = s.pad_token_id if s.pad_token_id is not None else (eos if eos is not None else -1)
        running = tf.fill((batch, k, length), tf.constant(fill, tf.int32))
        running = _set_column(running, 0, tf.fill((batch, k), tf.constant(s.decoder_start_token_id, tf.int32)))
        state = dict(
            running=running,
            running_scores=tf.concat([tf.zeros((batch, 1)), tf.fill((batch, k - 1), -1e9)], axis=1),
            sequences=running,
            scores=tf.fill((batch, k), -1e9),
            finished=tf.zeros((batch, k), tf.bool),
            lengths=tf.zeros((batch, k), tf.int32),  # generated tokens of each finished sequence
            improvable=tf.ones((batch, 1), tf.bool),
            done=tf.constant(False),
            cache=cache,
        )
        top_mask = (tf.range(keep) < k)[None, :]
        gather = lambda x, idx: tf.gather(x, idx, batch_dims=1)  # noqa: E731

        def cond(cur_len, st):
            return (cur_len < length) & ~st["done"]

        def body(cur_len, st):
            flat = tf.reshape(st["running"], (batch * k, length))
            logits, cache = self._step(tf.gather(flat, cur_len - 1, axis=1), cur_len - 1, st["cache"],
                                       encoder_hidden, encoder_mask)
            log_probs = _apply(procs, tf.nn.log_softmax(logits, axis=-1), flat, cur_len)
            log_probs = tf.reshape(log_probs, (batch, k, vocab)) + st["running_scores"][:, :, None]
            log_probs = tf.reshape(log_probs, (batch, k * vocab))
            if s.do_sample:  # sampling without replacement (Gumbel top-k), then sorted by log-prob
                step_seed = tf.stack([tf.constant(seed, tf.int32), cur_len])
                gumbel = -tf.math.log(-tf.math.log(tf.random.stateless_uniform(tf.shape(log_probs), step_seed,
                                                                               minval=1e-20, maxval=1.0)))
                picked = tf.math.top_k(log_probs + gumbel, keep).indices
                topk_scores, order = tf.math.top_k(gather(log_probs, picked), keep)
                topk_index = gather(picked, order)
            else:
                topk_scores, topk_index = tf.math.top_k(log_probs, keep)
            source_beam, token = topk_index // vocab, topk_index % vocab
            topk_seqs = _set_column(gather(st["running"], source_beam), cur_len, token)
            hits = tf.fill(tf.shape(token), cur_len + 1 >= length)
            if eos is not None:
                hits |= token == eos

            # the best num_beams candidates that did not end keep running
            running_scores = topk_scores + tf.cast(hits, tf.float32) * -1.0e9
            next_index = tf.math.top_k(running_scores, k).indices
            running = gather(topk_seqs, next_index)
            running_scores = gather(running_scores, next_index)
            beam_origin = gather(source_beam, next_index) + tf.range(batch)[:, None] * k
            beam_origin = tf.ensure_shape(beam_origin, next_index.shape)  # static under tf.function at batch 1

            # candidates among the top num_beams that ended join the finished set if they score better
            just_finished = hits & top_mask
            scaled = topk_scores / _length_penalty(cur_len + 1 - prompt, lp)
            full = tf.reduce_all(st["finished"], axis=-1, keepdims=True) & (early is True)
            scaled += tf.cast(full, tf.float32) * -1.0e9
            scaled += tf.cast(~st["improvable"], tf.float32) * -1.0e9
            scaled += tf.cast(~just_finished, tf.float32) * -1.0e9
            merged_scores = tf.concat([st["scores"], scaled], axis=1)
            best = tf.math.top_k(merged_scores, k).indices
            sequences = gather(tf.concat([st["sequences"], topk_seqs], axis=1), best)
            scores = gather(merged_scores, best)
            finished = gather(tf.concat([st["finished"], just_finished], axis=1), best)
            new_lengths = tf.fill(tf.shape(token), cur_len + 1 - prompt)
            lengths = gather(tf.concat([st["lengths"], new_lengths], axis=1), best)

            flat_origin = tf.reshape(beam_origin, (-1,))
            cache = tuple((tf.gather(sk, flat_origin), tf.gather(sv, flat_origin), ck, cv) for sk, sv, ck, cv in cache)
            cur_len = cur_len + 1

            # can a running beam still beat the worst finished one? (the reference's heuristic)
            best_len = (length - prompt) if (early == "never" and lp > 0.0) else (cur_len - prompt)
            best_running = running_scores[:, :1] / _length_penalty(best_len, lp)
            worst = tf.where(finished, tf.reduce_min(scores, axis=1, keepdims=True), -1.0e9)
            improvable = st["improvable"] & tf.reduce_any(best_running > worst, axis=-1, keepdims=True)
            open_beams = ~(tf.reduce_all(finished) & (early is True))
            done = ~(tf.reduce_any(improvable) & open_beams & ~tf.reduce_all(hits))
            return cur_len, dict(running=running, running_scores=running_scores, sequences=sequences, scores=scores,
                                 finished=finished, lengths=lengths, improvable=improvable, done=done, cache=cache)

        _, st = tf.while_loop(cond, body, (tf.constant(1), state))
        r = s.num_return_sequences
        sequences = tf.reshape(st["sequences"][:, :r], (-1, length))
        scores = tf.reshape(st["scores"][:, :r], (-1,))
        out_len = prompt + tf.reduce_max(st["lengths"][:, :r])
        return sequences, out_len, scores
