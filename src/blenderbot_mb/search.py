"""Greedy decoding, sampling and beam search, written once for every backend.

A backend hands `decode()` its `ArrayOps` (`search_ops.py`), its decoder step

    step(tokens [rows] int32, index, cache) -> (logits [rows, vocab] float32, cache)

which runs the token at position `index` through the decoder and writes its keys/values into the cache, and
`reorder(cache, rows [rows] int32) -> cache`, which beam search calls to follow the surviving beams. The loop
runs through `ops.while_loop` (a Python loop, `tf.while_loop`, `jax.lax.while_loop`), over buffers of fixed
shape, so compiled backends compile it whole.

Beam search is transformers' vectorized beam search rule for rule (2 x num_beams candidates a step, running
and finished hypotheses kept apart, sum(log p) / generated_length ** length_penalty, its early-stopping
heuristic), so the same weights give the same tokens.

`prepare()` is the one entry point of every backend's `generate()`: it resolves the settings, applies the
edge-case rules and checks the inputs, so every backend accepts and refuses the same calls.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import validation
from .errors import ConfigError, InputError
from .generation_config import as_generation_config
from .generation_hooks import Hooks
from .logits_process import build_processors, encoder_ngrams, with_callers
from .outputs import GenerateOutput

__all__ = ["SearchSpec", "DecodeState", "BeamState", "Request", "prepare", "decode", "infer_attention_mask",
           "build_processors", "encoder_ngrams", "generate_output", "record_encoder", "record_layers"]

NOT_DONE = -1.0e9  # the score that keeps a hypothesis out of a top-k


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SearchSpec:
    """Everything static about one search (hashable: a compiled loop's cache key)."""

    mode: str  # "greedy" | "sample" | "beam_search" | "beam_sample"
    max_length: int  # decoder length, prompt included
    prompt_length: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    eos_token_ids: tuple
    pad_token_id: int  # the fallback rule applied: pad, else the first eos, else 0
    plan: tuple  # the core's processor plan (ProcessorSpec, ...)
    output_scores: bool = False  # record each step's processed scores on the host
    output_logits: bool = False  # ... and its raw logits
    output_attentions: bool = False  # ... and its decoder's attention weights (self and cross), per layer
    output_hidden_states: bool = False  # ... and its decoder's hidden states, per layer
    beam_indices: bool = False  # beam search: follow each hypothesis's beam at every step (in the loop)
    host_stops: bool = False  # ask the host which rows stop (stopping criteria, stop strings, max_time)
    host_stream: bool = False  # put tokens to a streamer

    @property
    def layer_outputs(self) -> bool:
        """Whether the decoder step records its layers' attentions or hidden states (the model's own forward)."""
        return self.output_attentions or self.output_hidden_states

    @property
    def beam(self) -> bool:
        return self.num_beams > 1

    @property
    def copies(self) -> int:
        """Decoder rows per input: the beams, or the samples of each input."""
        return self.num_beams if self.beam else self.num_return_sequences

    @property
    def streams_per_input(self) -> int:
        """Random streams per input: one per sampled reply, one per input for beam sampling, none otherwise."""
        return {"sample": self.num_return_sequences, "beam_sample": 1}.get(self.mode, 0)


def fallback_pad_id(gen) -> int:
    """The pad id that fills finished rows: pad_token_id, else the first eos id (as transformers), else 0."""
    if gen.pad_token_id is not None:
        return gen.pad_token_id
    return gen.eos_token_ids[0] if gen.eos_token_ids else 0


def check_settings(gen) -> None:
    """The call-time rules every backend shares (beyond GenerationConfig.validate)."""
    if gen.num_return_sequences > 1 and gen.num_beams == 1 and not gen.do_sample:
        raise ConfigError(f"num_return_sequences={gen.num_return_sequences} needs beam search (num_beams > 1) "
                          "or sampling (do_sample=True)")
    if gen.num_beams > 1 and gen.num_return_sequences > gen.num_beams:
        raise ConfigError(f"num_return_sequences ({gen.num_return_sequences}) cannot exceed num_beams "
                          f"({gen.num_beams})")


@dataclass
class Request:
    """One generate() call, decided: the resolved settings, the static search spec, the seed and the hooks."""

    gen: Any  # ResolvedGeneration
    spec: SearchSpec
    seed: int | tuple | None  # one seed for the call, or one per input (see stream_ids)
    hooks: Hooks | None
    user_processors: tuple  # the caller's logits_processor, applied before the sampling warpers (as transformers)


def prepare(generation_config, model_config, kwargs: dict, *, prompt_length: int = 1) -> Request:
    """Resolve one generate() call's keyword arguments (consumed from `kwargs`): settings, seed, hooks."""
    seed = _check_seed(kwargs.pop("seed", None))
    user = kwargs.pop("logits_processor", None) or ()
    user = (user,) if callable(user) and not isinstance(user, (list, tuple)) else tuple(user)
    hook_kwargs = {k: kwargs.pop(k) for k in ("streamer", "stopping_criteria", "stop_strings", "tokenizer",
                                              "max_time") if k in kwargs}
    gen = as_generation_config(generation_config).resolve(model_config, prompt_length=prompt_length, **kwargs)
    kwargs.clear()
    check_settings(gen)
    pad = fallback_pad_id(gen)
    scores, logits, attentions, hidden = (bool(on and gen.return_dict_in_generate) for on in (
        gen.output_scores, gen.output_logits, gen.output_attentions, gen.output_hidden_states))
    if (attentions or hidden) and prompt_length > 1:
        raise ConfigError("output_attentions / output_hidden_states with a decoder_input_ids prompt are not "
                          "supported (each step's outputs are recorded from the start token on)")
    hooks = Hooks.from_kwargs(hook_kwargs, prompt_length=prompt_length, pad_token_id=pad, record_scores=scores,
                              record_logits=logits, record_attentions=attentions, record_hidden_states=hidden,
                              decoder_layers=model_config.decoder_layers, encoder_layers=model_config.encoder_layers)
    spec = SearchSpec(
        mode=gen.mode, max_length=gen.max_length, prompt_length=prompt_length, num_beams=gen.num_beams,
        num_return_sequences=gen.num_return_sequences, length_penalty=float(gen.length_penalty),
        early_stopping=gen.early_stopping, eos_token_ids=gen.eos_token_ids, pad_token_id=pad,
        plan=gen.processor_plan(), output_scores=scores, output_logits=logits, output_attentions=attentions,
        output_hidden_states=hidden,
        beam_indices=bool(gen.return_dict_in_generate and gen.num_beams > 1), host_stops=bool(hooks and hooks.stops),
        host_stream=bool(hooks and hooks.streamer is not None))
    return Request(gen=gen, spec=spec, seed=seed, hooks=hooks, user_processors=user)


def generate_inputs(input_ids, kwargs: dict):
    """generate()'s encoder input: `input_ids`, or the reference's name for it, `inputs=` (consumed from
    kwargs); InputError when neither or both are given."""
    inputs = kwargs.pop("inputs", None)
    if inputs is not None and input_ids is not None:
        raise InputError("pass input_ids or inputs (the same argument), not both")
    input_ids = inputs if input_ids is None else input_ids
    if input_ids is None:
        raise InputError("generate() needs input_ids (the tokenized conversation)")
    return input_ids


def decoder_prompt(generation_config, model_config, kwargs: dict, prompt, rows: int):
    """A `decoder_input_ids` prompt of host values [rows, n] (NumPy) as the search starts from it: one row per
    encoder input (InputError otherwise), and, as in transformers, the decoder start token put before it when
    none of its rows begins with that token. Returns the prompt (NumPy) and whether the token was added."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] != rows:
        raise InputError(f"decoder_input_ids has {prompt.shape[0] if prompt.ndim else 0} rows and input_ids {rows}: "
                         "give one decoder prompt per input")
    start = kwargs.get("decoder_start_token_id")
    if start is None:
        start = getattr(as_generation_config(generation_config), "decoder_start_token_id", None)
    if start is None:
        start = model_config.decoder_start_token_id
    if start is None or prompt.shape[1] and (prompt[:, 0] == start).any():
        return prompt, False
    return np.concatenate([np.full((rows, 1), start, prompt.dtype), prompt], axis=1), True


def _check_seed(seed):
    """None, an int, or one int per input (a list); ints are taken as 64-bit words, like torch.manual_seed. A
    scalar integer tensor (a seed computed inside a compiled function, e.g. an exported serving signature) is
    kept as it is, for the backend's `ops.seed_words`."""
    if seed is None:
        return None
    if not isinstance(seed, (np.ndarray, np.generic)) and getattr(seed, "shape", None) == () and "int" in str(
            getattr(seed, "dtype", "")):
        return seed
    if isinstance(seed, (list, tuple, np.ndarray)) and len(seed):
        return tuple(_seed_word(s, seed) for s in seed)
    return _seed_word(seed, seed)


def _seed_word(value, seed) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"seed must be an integer or a list of integers (one per input), got {seed!r}")
    return int(value) % 2**64


def stream_ids(ops, spec: SearchSpec, seed, batch):
    """The names of the sampled rows' random streams, [batch * spec.streams_per_input, 6] int32 (None when the
    search does not sample): the 64-bit seed of the row's input as four 16-bit words, the input's place in the
    call (an int seed: input i of the batch; a seed per input: 0), the row's index among its input's rows.

    Each row draws from its own stream, so a reply depends only on its input, its seed and its index, never on
    the other rows of the batch; `generate([x], seed=s)` and any batch with `seed=[..., s, ...]` give `x` the
    same replies. Backends turn the names into their generators with `ops.streams`."""
    per = spec.streams_per_input
    if not per:
        return None
    if isinstance(seed, tuple):
        if isinstance(batch, int) and len(seed) != batch:
            raise InputError(f"seed has {len(seed)} values for {batch} inputs: give one per input, or one int")
        words, place = ops.constant([_halves(s) for s in seed], "int32"), ops.full((len(seed),), 0, "int32")
    else:
        words = ops.constant([_halves(seed)], "int32") if isinstance(seed, int) else ops.seed_words(seed)
        words = words + ops.full((batch, 4), 0, "int32")
        place = ops.arange(batch)
    rows = ops.arange(batch * per)
    return ops.concat([ops.repeat(words, per, axis=0), ops.reshape(ops.repeat(place, per, axis=0), (-1, 1)),
                       ops.reshape(rows % per, (-1, 1))], axis=1)


def _halves(seed: int) -> list:
    return [(seed >> shift) & 0xFFFF for shift in (48, 32, 16, 0)]


def refuse_host_hooks(request: Request, inside: str) -> None:
    """Host hooks (streamer, stopping criteria, stop strings, max_time, per-step scores) run Python at every
    step; inside a caller's compiled function (`inside`: tf.function, an outer jax.jit) they cannot run: a clear
    error that names them, before anything is traced."""
    if request.hooks is not None:
        given = request.hooks.arguments()
        names = " and ".join(f"{name}=" for name in given)
        raise ConfigError(f"{names} {'runs' if len(given) == 1 else 'run'} Python on the host at every step, which "
                          f"cannot happen inside {inside}; call generate() outside it to use "
                          f"{'it' if len(given) == 1 else 'them'}")


def check_inputs(input_ids, attention_mask, model_config, what: str = "input_ids", values: bool = True) -> None:
    """The checks of `blenderbot_mb.validation` (shape, dtype, range; values only when `values`: not while
    tracing) on generate()'s inputs as the caller gave them, so every backend refuses the same inputs."""
    info = validation.check_input_ids(input_ids, model_config.vocab_size, model_config.max_position_embeddings,
                                      what, values=values)
    validation.check_attention_mask(attention_mask, info.shape, values=values)


ENCODER_BUCKET = 32  # compiled searches and captured steps see encoder inputs padded to a multiple of this


def encoder_bucket(width: int, max_positions: int) -> int:
    """The encoder length a compiled search or captured step runs an input of `width` tokens at: the next
    multiple of ENCODER_BUCKET (at most the model's positions), so inputs of similar lengths share one compile
    instead of one each (a chat's history grows every turn). The added positions are masked."""
    return max(width, min(-(-width // ENCODER_BUCKET) * ENCODER_BUCKET, max_positions))


def check_rows_attend(attention_mask) -> None:
    """A row whose mask (given or inferred) hides every token has nothing to reply to: an error, not noise."""
    empty = np.flatnonzero(~np.asarray(attention_mask).astype(bool).any(axis=1))
    if len(empty):
        raise InputError(f"attention_mask row {int(empty[0])} masks every token: nothing to reply to")


def infer_attention_mask(ops, input_ids, gen):
    """The one rule for a missing mask (transformers'): pad tokens are masked when pad_token_id is set and is
    not an eos id; otherwise every token is attended."""
    pad = gen.pad_token_id
    if pad is not None and pad not in gen.eos_token_ids:
        return ops.cast(input_ids != pad, "int32")
    return ops.cast(input_ids == input_ids, "int32")


# ---------------------------------------------------------------------- loop states
@dataclass(frozen=True)
class DecodeState:
    """Greedy decoding and sampling. N = batch * num_return_sequences rows, L = max_length."""

    tokens: Any  # [N, L] int32: prompt, generated tokens, pad after a row's end
    cur_len: Any  # scalar int: filled columns
    unfinished: Any  # [N] bool
    ends: Any  # [N] int32: the length of each finished row (L while running)
    cache: Any  # the backend's decoder cache
    key: Any  # the backend's random state (None when not sampling)


@dataclass(frozen=True)
class BeamState:
    """Beam search. B inputs, K = num_beams beams, L = max_length."""

    running: Any  # [B, K, L] int32: the live hypotheses
    running_scores: Any  # [B, K] float32: their sum of log-probabilities
    sequences: Any  # [B, K, L] int32: the best finished hypotheses, best first
    scores: Any  # [B, K] float32: their length-penalized scores (NOT_DONE for empty slots)
    lengths: Any  # [B, K] int32: their lengths
    finished: Any  # [B, K] bool: which slots hold a finished hypothesis
    improvable: Any  # [B, 1] bool: a running beam can still beat the worst finished one
    go_on: Any  # scalar bool: the search goes on
    cur_len: Any  # scalar int: filled columns of `running`
    cache: Any  # the backend's decoder cache, one row per beam
    key: Any  # the backend's random state (None when not sampling)
    running_beams: Any = None  # [B, K, L - P] int32: the beam (row of the B * K) of each generated token, -1
    beams: Any = None  # after the end, of `running` and `sequences` (unless SearchSpec.beam_indices: [1])


def _loop(ops, cond, body, state, max_steps: int, lazy: bool = False):
    """ops.while_loop over a dataclass state (compiled loops take tuples; eager ones the state as it is)."""
    if ops.eager:
        return ops.while_loop(cond, body, state, max_steps=max_steps, lazy=lazy)
    cls = type(state)
    out = ops.while_loop(lambda t: cond(cls(*t)), lambda t: tuple(_astuple(body(cls(*t)))),
                         tuple(_astuple(state)), max_steps=max_steps, lazy=lazy)
    return cls(*out)


def _astuple(state):
    return (getattr(state, f.name) for f in fields(state))


def _apply(processors, tokens, cur_len, scores):
    for process in processors:
        scores = process(tokens, cur_len, scores)
    return scores


def _is_eos(ids, eos_ids):
    if not eos_ids:
        return ids != ids
    hit = ids == eos_ids[0]
    for eos in eos_ids[1:]:
        hit = hit | (ids == eos)
    return hit


def _prefill(ops, step, cache, tokens, prompt_length: int):
    """Run the prompt's tokens before the last one through the decoder (their logits are not needed)."""
    for index in range(prompt_length - 1):
        _, cache = step(ops.column(tokens, index), index, cache)
    return cache


def _initial_tokens(ops, prompt, max_length: int, pad: int):
    rows, length = ops.size(prompt, 0), prompt.shape[1]
    return ops.concat([ops.cast(prompt, "int32"), ops.full((rows, max_length - length), pad, "int32")], axis=1)


# ---------------------------------------------------------------------- sampling
def _categorical(ops, key, scores):
    """One token per row [N] drawn from softmax(scores [N, V]) by its row's stream: the first token whose
    cumulative probability reaches u * total, u in (0, 1] (a token of probability 0 is never drawn)."""
    cdf = ops.cumsum(ops.softmax(scores))
    u, key = ops.uniform(key, ())
    return ops.argmax(ops.cast(cdf >= (1.0 - u)[:, None] * cdf[:, -1:], "float32")), key


def _gumbel(ops, key, like):
    """Standard Gumbel noise shaped like `like` [N, M], row r from stream r."""
    u, key = ops.uniform(key, (like.shape[1],))
    return -ops.log(-ops.log(ops.where(u > 0.0, u, 1e-20))), key


# ---------------------------------------------------------------------- greedy and sampling
def _greedy_or_sample(ops, spec, step, cache, prompt, processors, key, hooks):
    rows, length = ops.size(prompt, 0), spec.max_length
    tokens = _initial_tokens(ops, prompt, length, spec.pad_token_id)
    cache = _prefill(ops, step, cache, tokens, spec.prompt_length)
    state = DecodeState(tokens=tokens, cur_len=spec.prompt_length, unfinished=ops.full((rows,), True, "bool"),
                        ends=ops.full((rows,), length, "int32"), cache=cache, key=key)

    def cond(st):  # the driver stops after max_steps, at cur_len == length
        return ops.any(st.unfinished)

    def body(st):
        logits, cache = step(ops.column(st.tokens, st.cur_len - 1), st.cur_len - 1, st.cache)
        scores = _apply(processors, st.tokens, st.cur_len, logits)
        _record(ops, spec, hooks, scores, logits)
        key = st.key
        if spec.mode == "sample":
            chosen, key = _categorical(ops, key, scores)
        else:
            chosen = ops.argmax(scores)
        chosen = ops.where(st.unfinished, chosen, spec.pad_token_id)
        tokens = ops.set_column(st.tokens, st.cur_len, chosen)
        stop = _is_eos(chosen, spec.eos_token_ids)
        if spec.host_stops:
            stop = stop | ops.host_call(hooks.should_stop, (tokens, st.cur_len + 1, scores), result_rows=rows)
        if spec.host_stream:
            ops.host_call(hooks.put_tokens, (chosen,))
        stop = stop & st.unfinished
        ends = ops.masked_fill(st.ends, stop, st.cur_len + 1)
        return DecodeState(tokens=tokens, cur_len=st.cur_len + 1, unfinished=st.unfinished & ~stop, ends=ends,
                           cache=cache, key=key)

    lazy = not (spec.host_stops or spec.host_stream or spec.output_scores or spec.output_logits or
                spec.layer_outputs)
    state = _loop(ops, cond, body, state, max_steps=length - spec.prompt_length, lazy=lazy)
    return state.tokens, ops.max(state.ends), None, None


# ---------------------------------------------------------------------- beam search
def _beam_search(ops, spec, step, cache, prompt, processors, key, hooks, reorder):
    batch, k, length, p = ops.size(prompt, 0) // spec.num_beams, spec.num_beams, spec.max_length, spec.prompt_length
    keep = max(2, 1 + len(spec.eos_token_ids)) * k  # candidates a step: enough for k to go on if k end
    lp, early = spec.length_penalty, spec.early_stopping
    # length ** length_penalty for every possible length, in double precision like the reference: Python floats
    # where cur is a Python int (eager loops), a float32 array indexed by the loop's counter in compiled ones
    penalty = [float(n) ** lp if n else 1.0 for n in range(length + 1)]
    if not ops.eager:
        penalty = ops.constant(np.array(penalty, np.float32), "float32")
    top_k_mask = ops.constant(np.arange(keep) < k, "bool")[None, :]
    batch_offset = ops.arange(batch)[:, None] * k

    tokens = _initial_tokens(ops, prompt, length, spec.pad_token_id)
    cache = _prefill(ops, step, cache, tokens, p)
    running = ops.reshape(tokens, (-1, k, length))
    # (not followed: a placeholder, as compiled loops hold no None)
    beams = ops.full((batch, k, length - p) if spec.beam_indices else (1,), -1, "int32")
    first_live = np.where(np.arange(k) == 0, 0.0, NOT_DONE).astype(np.float32)  # only beam 0 is live at first
    state = BeamState(
        running=running, running_scores=ops.constant(first_live[None, :], "float32") + ops.full((batch, 1), 0.0,
                                                                                                "float32"),
        sequences=running, scores=ops.full((batch, k), NOT_DONE, "float32"), lengths=ops.full((batch, k), 0, "int32"),
        finished=ops.full((batch, k), False, "bool"), improvable=ops.full((batch, 1), True, "bool"),
        go_on=ops.constant(True, "bool"), cur_len=p, cache=cache, key=key, running_beams=beams, beams=beams)

    def cond(st):  # the driver stops after max_steps, at cur_len == length
        return st.go_on

    def body(st):
        cur = st.cur_len
        flat = ops.reshape(st.running, (-1, length))
        logits, cache = step(ops.column(flat, cur - 1), cur - 1, st.cache)
        log_probs = _apply(processors, flat, cur, ops.log_softmax(logits))
        _record(ops, spec, hooks, log_probs, logits)
        vocab = log_probs.shape[-1]
        totals = ops.reshape(ops.reshape(log_probs, (-1, k, vocab)) + st.running_scores[:, :, None],
                             (-1, k * vocab))

        # the best `keep` continuations over all beams (sampled without replacement: Gumbel top-k)
        key = st.key
        if spec.mode == "beam_sample":
            noise, key = _gumbel(ops, key, totals)
            picked = ops.top_k(totals + noise, keep)[1]
            cand_scores, order = ops.top_k(ops.take_along(totals, picked, axis=1), keep)
            picked = ops.take_along(picked, order, axis=1)
        else:
            cand_scores, picked = ops.top_k(totals, keep)
        source, token = picked // vocab, picked % vocab
        cand = ops.set_column(ops.gather_beams(st.running, source), cur, token)  # [B, keep, L]
        hits = ops.select(cur + 1 >= length, lambda: token == token, lambda: _is_eos(token, spec.eos_token_ids))
        if spec.host_stops:
            stops = ops.host_call(hooks.should_stop, (ops.reshape(cand, (-1, length)), cur + 1, log_probs),
                                  result_rows=batch * keep)
            hits = hits | ops.reshape(stops, (-1, keep))

        # the best k candidates that did not end go on
        live = cand_scores + ops.cast(hits, "float32") * NOT_DONE
        nxt = ops.top_k(live, k)[1]
        running = ops.gather_beams(cand, nxt)
        running_scores = ops.take_along(live, nxt, axis=1)
        parent = ops.take_along(source, nxt, axis=1)

        # candidates among the top k that ended join the finished set if they score better
        just_finished = hits & top_k_mask
        scaled = cand_scores / penalty[cur + 1 - p]
        if early is True:
            scaled = scaled + ops.cast(ops.all(st.finished, axis=-1, keepdims=True), "float32") * NOT_DONE
        scaled = scaled + ops.cast(~st.improvable, "float32") * NOT_DONE
        scaled = scaled + ops.cast(~just_finished, "float32") * NOT_DONE
        merged = ops.concat([st.scores, scaled], axis=1)
        best = ops.top_k(merged, k)[1]
        sequences = ops.gather_beams(ops.concat([st.sequences, cand], axis=1), best)
        scores = ops.take_along(merged, best, axis=1)
        lengths = ops.take_along(ops.concat([st.lengths, token * 0 + (cur + 1)], axis=1), best, axis=1)
        finished = ops.take_along(ops.concat([st.finished, just_finished], axis=1), best, axis=1)

        cache = reorder(cache, ops.reshape(parent + batch_offset, (-1,)))
        running_beams, beams = st.running_beams, st.beams
        if spec.beam_indices:  # transformers' beam_indices: a candidate's beams, then the one it grew from
            cand_beams = ops.set_column(ops.gather_beams(running_beams, source), cur - p, source + batch_offset)
            running_beams = ops.gather_beams(cand_beams, nxt)
            beams = ops.gather_beams(ops.concat([beams, cand_beams], axis=1), best)

        # can a running beam still beat the worst finished one? (the reference's heuristic)
        best_len = (length - p) if (early == "never" and lp > 0.0) else (cur + 1 - p)
        best_running = running_scores[:, :1] / penalty[best_len]
        worst = ops.where(finished, ops.min(scores, axis=1, keepdims=True), NOT_DONE)
        improvable = st.improvable & ops.any(best_running > worst, axis=-1, keepdims=True)
        if spec.host_stream:
            ops.host_call(hooks.put_beams, (running, sequences, lengths, finished, improvable, cur + 1))
        go_on = ops.any(improvable) & ~ops.all(hits)
        if early is True:
            go_on = go_on & ~ops.all(finished)
        return BeamState(running=running, running_scores=running_scores, sequences=sequences, scores=scores,
                         lengths=lengths, finished=finished, improvable=improvable, go_on=go_on, cur_len=cur + 1,
                         cache=cache, key=key, running_beams=running_beams, beams=beams)

    st = _loop(ops, cond, body, state, max_steps=length - p)
    r = spec.num_return_sequences
    sequences = ops.reshape(st.sequences[:, :r], (-1, length))
    beams = ops.reshape(st.beams[:, :r], (-1, length - p)) if spec.beam_indices else None
    return sequences, ops.max(st.lengths[:, :r]), ops.reshape(st.scores[:, :r], (-1,)), beams


# ---------------------------------------------------------------------- the entry point of the loops
def decode(ops, request: Request, step, cache, prompt, processors, key=None, reorder=None):
    """Run the search. `prompt` [batch, P] int: the decoder prompt per input (repeated here for beams and
    samples); `cache` has one row per decoder row (batch * spec.copies); `key`, when sampling, the rows'
    random streams (`ops.streams(stream_ids(...))`). Returns (sequences [rows, L] int32,
    length: the columns that hold tokens, sequences_scores [rows] for beam search else None, beam_indices
    [rows, L - P] when spec.beam_indices else None); rows are batch * num_return_sequences, each input's rows
    together, padded after their end."""
    spec, hooks = request.spec, request.hooks
    if spec.copies > 1:
        prompt = ops.repeat(prompt, spec.copies, axis=0)
    processors = with_callers(list(processors), [_user(ops, fn, i) for i, fn in enumerate(request.user_processors)])
    if hooks is not None and spec.host_stream:
        ops.host_call(hooks.put_prompt, (prompt[::spec.copies] if spec.beam else prompt,))
    if spec.beam:
        out = _beam_search(ops, spec, step, cache, prompt, processors, key, hooks, reorder)
    else:
        out = _greedy_or_sample(ops, spec, step, cache, prompt, processors, key, hooks)
    if hooks is not None and spec.host_stream:
        best = out[0][::spec.num_return_sequences] if spec.beam else out[0]
        ops.host_call(lambda seqs, length: hooks.finish(seqs, spec.num_beams, length), (best, out[1]))
    return out


def _record(ops, spec, hooks, scores, logits) -> None:
    """output_scores / output_logits: the step's processed scores and raw logits, kept by the host."""
    if spec.output_scores:
        ops.host_call(hooks.record, (scores,))
    if spec.output_logits:
        ops.host_call(hooks.record_raw, (logits,))


def generate_output(request: Request, sequences, length, sequences_scores, beam_indices, trim: bool = True):
    """generate()'s GenerateOutput (return_dict_in_generate) from decode()'s results, as transformers gives it:
    `scores` / `logits` one entry per step the search ran (beam search may run past its longest returned
    hypothesis), `beam_indices` [rows, generated columns] with -1 after a hypothesis' end. `trim`: `length` is
    concrete (not inside a caller's compiled function), so beam_indices are cut to the longest hypothesis."""
    spec, hooks = request.spec, request.hooks
    steps = int(length) - spec.prompt_length if trim else None

    def recorded(values):
        return tuple(values if spec.beam or steps is None else values[:steps])

    if beam_indices is not None and trim:
        beam_indices = beam_indices[:, :steps]
    layers = recorded(hooks.recorded_layers) if spec.layer_outputs else ()
    attentions, hidden = spec.output_attentions, spec.output_hidden_states
    return GenerateOutput(sequences=sequences, sequences_scores=sequences_scores,
                          scores=recorded(hooks.recorded) if spec.output_scores else None,
                          logits=recorded(hooks.recorded_logits) if spec.output_logits else None,
                          beam_indices=beam_indices,
                          encoder_attentions=hooks.encoder_attentions if attentions else None,
                          encoder_hidden_states=hooks.encoder_hidden_states if hidden else None,
                          decoder_attentions=tuple(step[0] for step in layers) if attentions else None,
                          cross_attentions=tuple(step[1] for step in layers) if attentions else None,
                          decoder_hidden_states=tuple(step[2] for step in layers) if hidden else None)


def record_encoder(ops, spec, hooks, attentions=(), hidden_states=()) -> None:
    """output_attentions / output_hidden_states: the encoder's per-layer attentions and hidden states, kept by
    the host (from inside a compiled search too)."""
    arrays = (*(attentions if spec.output_attentions else ()), *(hidden_states if spec.output_hidden_states else ()))
    ops.host_call(hooks.record_encoder_arrays, arrays)


def record_layers(ops, spec, hooks, index, attentions=(), cross_attentions=(), hidden_states=()) -> None:
    """output_attentions / output_hidden_states: a decoder step's per-layer self- and cross-attention weights
    ([rows, heads, 1, keys]) and hidden states ([rows, 1, d_model], the embeddings' first), kept by the host for
    the step at position `index` (a backend's step calls this with what its decoder returned)."""
    arrays = (*(attentions if spec.output_attentions else ()), *(cross_attentions if spec.output_attentions else ()),
              *(hidden_states if spec.output_hidden_states else ()))
    ops.host_call(hooks.record_layers, (index, *arrays))


def _user(ops, fn, index: int):
    """A caller's logits processor in the backend's convention (`ArrayOps.call_processor`), its arguments
    checked first: a clear error, not a TypeError from inside a traced loop."""
    wanted = ", ".join(ops.processor_arguments)
    if not callable(fn):
        raise ConfigError(f"logits_processor[{index}] must be a function ({wanted}) -> scores, got {fn!r}")
    try:
        inspect.signature(fn).bind(*ops.processor_arguments)
    except TypeError:
        raise ConfigError(f"logits_processor[{index}] must take ({wanted}) in this backend, "
                          f"got {fn!r}") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass
    return lambda tokens, cur_len, scores: ops.call_processor(fn, tokens, cur_len, scores)

