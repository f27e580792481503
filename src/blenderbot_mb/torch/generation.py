"""`generate()` for the PyTorch backend: logits processors, then the greedy/sampling and beam search loops.

Processors are small callables `(decoder_ids [N, t], scores [N, vocab]) -> scores`, built in the reference's
order (repetition penalty, n-gram blocking, encoder n-gram blocking, bad words, minimum length, forced
BOS/EOS; then temperature, top-k, top-p when sampling). The loops run the encoder once, compute every
layer's cross-attention keys/values once, and write self-attention keys/values into preallocated buffers
at the step index. Beam search follows the reference's vectorized algorithm step for step (candidate
count, length penalty, early-stopping rules, ordering), so the same weights give the same tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import validation
from ..errors import InputError
from ..outputs import GenerateOutput


# ---------------------------------------------------------------------- logits processors
class RepetitionPenalty:
    """Divide positive (multiply negative) scores of tokens already in the decoder sequence."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, ids, scores):
        seen = scores.gather(1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, ids, seen)


def _ban_ngram_completions(windows, ids, scores):
    """Ban the last token of every n-gram window whose first n-1 tokens equal the last n-1 decoder tokens."""
    n = windows.shape[-1]
    prefix = ids[:, ids.shape[1] - n + 1:]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)  # non-matches go to a spare column
    return scores.masked_fill(banned[:, :vocab], -math.inf)


class NoRepeatNGram:
    """No n-gram may occur twice in the decoder sequence."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, ids, scores):
        if ids.shape[1] < self.n:
            return scores
        return _ban_ngram_completions(ids.unfold(1, self.n, 1), ids, scores)


class EncoderNoRepeatNGram:
    """No n-gram of the encoder input may occur in the reply (padding included, as the reference)."""

    def __init__(self, n: int, encoder_input_ids):
        self.n = n
        self.windows = encoder_input_ids.unfold(1, n, 1) if encoder_input_ids.shape[1] >= n else None
        self.batch = encoder_input_ids.shape[0]

    def __call__(self, ids, scores):
        if self.windows is None or ids.shape[1] < self.n - 1:
            return scores
        if self.windows.shape[0] != ids.shape[0]:  # one row per hypothesis, grouped by batch item
            self.windows = self.windows.repeat_interleave(ids.shape[0] // self.batch, dim=0)
        return _ban_ngram_completions(self.windows, ids, scores)


class NoBadWords:
    """Ban single tokens always, and a sequence's last token when the decoder ends with the rest of it."""

    def __init__(self, bad_words_ids, eos_token_id, device):
        words = [list(w) for w in bad_words_ids if list(w) != [eos_token_id]]
        self.single = torch.tensor([w[0] for w in words if len(w) == 1], dtype=torch.long, device=device)
        self.multi = [(torch.tensor(w[:-1], device=device), w[-1]) for w in words if len(w) > 1]

    def __call__(self, ids, scores):
        scores = scores.index_fill(1, self.single, -math.inf) if len(self.single) else scores
        for prefix, last in self.multi:
            if len(prefix) <= ids.shape[1]:
                hit = (ids[:, ids.shape[1] - len(prefix):] == prefix).all(-1)
                scores[:, last] = scores[:, last].masked_fill(hit, -math.inf)
        return scores


class MinLength:
    """Ban EOS while the decoder sequence (start token included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id: int):
        self.min_length, self.eos = min_length, eos_token_id

    def __call__(self, ids, scores):
        if ids.shape[1] < self.min_length:
            scores = scores.clone()
            scores[:, self.eos] = -math.inf
        return scores


class ForceToken:
    """Only `token` may follow when the decoder sequence has length `at` (BOS at 1, EOS at max_length - 1)."""

    def __init__(self, at: int, token: int):
        self.at, self.token = at, token

    def __call__(self, ids, scores):
        if ids.shape[1] == self.at:
            scores = torch.full_like(scores, -math.inf)
            scores[:, self.token] = 0
        return scores


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, ids, scores):
        return scores / self.temperature


class TopK:
    def __init__(self, k: int, min_keep: int = 1):
        self.k = max(k, min_keep)

    def __call__(self, ids, scores):
        kth = torch.topk(scores, min(self.k, scores.shape[-1]))[0][..., -1:]
        return scores.masked_fill(scores < kth, -math.inf)


class TopP:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least `p`."""

    def __init__(self, p: float, min_keep: int = 1):
        self.p, self.min_keep = p, min_keep

    def __call__(self, ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.p
        remove[..., -self.min_keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def logits_processors(gen, encoder_input_ids, device) -> list:
    """The processors of `gen.processor_plan()` (core: which ones, in which order, with which parameters)."""
    build = {
        "repetition_penalty": RepetitionPenalty,
        "no_repeat_ngram": NoRepeatNGram,
        "encoder_no_repeat_ngram": lambda n: EncoderNoRepeatNGram(n, encoder_input_ids),
        "bad_words": lambda words: NoBadWords(words, None, device),  # the plan already dropped eos-only words
        "min_length": lambda length, eos_ids: MinLength(length, list(eos_ids)),
        "forced_bos": lambda token, at: ForceToken(at, token),
        "forced_eos": lambda token, at: ForceToken(at, token),
        "temperature": Temperature,
        "top_k": TopK,
        "top_p": TopP,
    }
    return [build[spec.name](*spec.params) for spec in gen.processor_plan()
            if spec.name != "encoder_no_repeat_ngram" or encoder_input_ids is not None]


def _apply(procs, ids, scores):
    for p in procs:
        scores = p(ids, scores)
    return scores


# ---------------------------------------------------------------------- the decoder step as a CUDA graph
class CudaGraphStep:
    """One decoder step (all layers + LM head) captured once as a CUDA graph and replayed for every token:
    one launch instead of hundreds of small kernels, which is what bounds decoding speed at small batch.

    Everything the graph reads lives in static buffers owned here: the self-attention cache [layers, 2,
    rows, heads, max_length, head_dim] (attended in full, masked beyond the step index), the cross-attention
    keys/values and the encoder mask (padded to a multiple of BUCKET positions, so inputs of similar length
    share a graph), the tokens and the step index, which lives on the device. A model keeps a few captured
    steps, keyed by shapes, dtype and its parameters' addresses, so repeated generate() calls replay without
    capturing again. Beam search reorders `kv` in place between steps, which the graph sees.
    """

    BUCKET = 32

    def __init__(self, model, rows: int, max_length: int, encoder_length: int, dtype, device):
        layers = model.get_decoder().layers
        heads, head_dim = layers[0].self_attn.num_heads, layers[0].self_attn.head_dim
        self.kv = torch.zeros(len(layers), 2, rows, heads, max_length, head_dim, dtype=dtype, device=device)
        self.cross = torch.zeros(len(layers), 2, rows, heads, encoder_length, head_dim, dtype=dtype, device=device)
        self.mask = torch.zeros(rows, encoder_length, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        cache = [(self.kv[i, 0], self.kv[i, 1], self.cross[i, 0], self.cross[i, 1]) for i in range(len(layers))]
        states = torch.zeros(rows, encoder_length, 1, dtype=dtype, device=device)  # only switches cross-attention on

        def run():
            return model._next_logits(self.tokens, self.index, cache, states, self.mask)

        side = torch.cuda.Stream(device)  # warm up on a side stream, as CUDA graph capture requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()  # writes cache position 0, which the first real step overwrites
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()

    def load(self, cross, mask) -> None:
        """A new batch: its cross-attention keys/values and encoder mask (None: no padding)."""
        length = cross[0][0].shape[2]
        for i, (k, v) in enumerate(cross):
            self.cross[i, 0, :, :, :length].copy_(k)
            self.cross[i, 1, :, :, :length].copy_(v)
        self.mask.zero_()
        self.mask[:, :length] = 1 if mask is None else mask

    def __call__(self, tokens, index: int):
        self.tokens.copy_(tokens)
        self.index.fill_(index)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is reused by the next replay


# ---------------------------------------------------------------------- generate
class GenerationMixin:
    """`generate()` for BlenderbotForConditionalGeneration (needs `model`, `lm_head`, `final_logits_bias`)."""

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """Replies for a batch of encoder inputs. Settings: the model's `generation_config`, then
        `generation_config`, then keyword arguments (max_length, num_beams, do_sample, top_k, ...).
        `generator=` (a torch.Generator) or `seed=` make sampling repeatable. On CUDA devices the decoder step
        runs as a replayed CUDA graph; `cuda_graph=False` runs it eagerly.

        Returns decoder ids `[batch * num_return_sequences, length]` starting with the decoder start
        token, padded after EOS; with `return_dict_in_generate=True` a GenerateOutput (with
        `sequences_scores` for beam search and `scores` when `output_scores=True`).
        """
        generator, seed = kwargs.pop("generator", None), kwargs.pop("seed", None)
        cuda_graph = kwargs.pop("cuda_graph", True)
        if kwargs.pop("decoder_input_ids", None) is not None:
            raise InputError("generate() starts every reply from decoder_start_token_id; decoder_input_ids "
                             "prompts are not supported")
        gen = (generation_config or self.generation_config).resolve(self.config, **kwargs)
        if input_ids is None:
            raise InputError("generate() needs input_ids (the tokenized conversation)")
        validation.check_model_inputs(input_ids, attention_mask, self.config)
        device = self.device
        input_ids = torch.as_tensor(input_ids, device=device)
        if attention_mask is None:  # as the reference: infer it from padding when pad != eos
            pad = gen.pad_token_id
            if pad is not None and pad != gen.eos_token_id and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.as_tensor(attention_mask, device=device)
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        if seed is not None and generator is None:
            generator = torch.Generator(device=device).manual_seed(int(seed))

        encoder_states = self.get_encoder()(input_ids, attention_mask, return_dict=True).last_hidden_state
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: cross-attention needs no mask
        procs = logits_processors(gen, input_ids, device)
        if gen.mode in ("beam_search", "beam_sample"):
            sequences, scores, step_scores = self._beam_search(gen, encoder_states, attention_mask, procs, generator,
                                                                   cuda_graph)
        else:
            sequences, step_scores = self._greedy_or_sample(gen, encoder_states, attention_mask, procs, generator,
                                                              cuda_graph)
            scores = None
        if not gen.return_dict_in_generate:
            return sequences
        return GenerateOutput(sequences=sequences, sequences_scores=scores,
                              scores=tuple(step_scores) if gen.output_scores else None)

    # ------------------------------------------------------------------ pieces of the loops
    def _cross_kv(self, encoder_states, copies: int):
        """Per decoder layer the cross-attention keys/values, computed once (repeated for beams/samples)."""
        out = []
        for layer in self.get_decoder().layers:
            k, v = layer.encoder_attn.project_kv(encoder_states)
            if copies > 1:
                k, v = k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)
            out.append((k, v))
        return out

    def _decoder_cache(self, encoder_states, encoder_mask, max_length: int, copies: int, cuda_graph: bool):
        """(step, kv): `step(tokens [rows, 1], index)` gives float32 logits of the next token, `kv` is the
        preallocated self-attention cache [layers, 2, rows, heads, max_length, head_dim] that beam search
        reorders in place. On CUDA devices the step is a replayed CUDA graph, else the eager decoder."""
        cross = self._cross_kv(encoder_states, copies)
        states, mask = self._expand(encoder_states, encoder_mask, copies)
        rows, device = states.shape[0], states.device
        if device.type == "cuda" and cuda_graph:
            step = self._graph_step(rows, max_length, states.shape[1], states.dtype, device)
            step.load(cross, mask)
            return step, step.kv
        attn = self.get_decoder().layers[0].self_attn
        kv = states.new_zeros(len(cross), 2, rows, attn.num_heads, max_length, attn.head_dim)
        cache = [(kv[i, 0], kv[i, 1], k, v) for i, (k, v) in enumerate(cross)]
        return (lambda tokens, index: self._next_logits(tokens, index, cache, states, mask)), kv

    def _graph_step(self, rows, max_length, encoder_length, dtype, device, keep: int = 4) -> CudaGraphStep:
        """A captured step for these shapes, reused while the parameters stay where they are."""
        steps = self.__dict__.setdefault("_cuda_graph_steps", {})
        bucket = -(-encoder_length // CudaGraphStep.BUCKET) * CudaGraphStep.BUCKET
        where = tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers()))
        key = (rows, max_length, bucket, dtype, str(device), where)
        if key not in steps:
            while len(steps) >= keep:
                steps.pop(next(iter(steps)))
            steps[key] = CudaGraphStep(self, rows, max_length, bucket, dtype, device)
        steps[key] = steps.pop(key)  # most recently used last
        return steps[key]

    def _next_logits(self, tokens, index: int, cache, encoder_states, encoder_mask):
        """Float32 logits [rows, vocab] of the token after `tokens` ([rows, 1], at position `index`)."""
        out = self.get_decoder()(tokens, encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
                                 past_key_values=cache, use_cache=True, cache_index=index, return_dict=True)
        logits = self.lm_head(out.last_hidden_state[:, -1]) + self.final_logits_bias[0].to(out.last_hidden_state.dtype)
        return logits.float()

    @staticmethod
    def _expand(encoder_states, encoder_mask, copies: int):
        # the cross-attention K/V come from the cache; the states only tell the layers to run it
        states = encoder_states.repeat_interleave(copies, 0) if copies > 1 else encoder_states
        mask = encoder_mask.repeat_interleave(copies, 0) if copies > 1 and encoder_mask is not None else encoder_mask
        return states, mask

    def _greedy_or_sample(self, gen, encoder_states, encoder_mask, procs, generator, cuda_graph=True):
        copies = gen.num_return_sequences if gen.do_sample else 1
        step, _ = self._decoder_cache(encoder_states, encoder_mask, gen.max_length, copies, cuda_graph)
        rows, device = encoder_states.shape[0] * copies, encoder_states.device
        pad = gen.pad_token_id if gen.pad_token_id is not None else 0
        eos = gen.eos_token_id
        seqs = torch.full((rows, gen.max_length), pad, dtype=torch.long, device=device)
        seqs[:, 0] = gen.decoder_start_token_id
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        done_at = torch.full((rows,), gen.max_length, dtype=torch.long, device=device)
        check_every = 1 if device.type == "cpu" else 8  # on accelerators, sync with the host less often
        step_scores = []
        for cur in range(1, gen.max_length):
            logits = step(seqs[:, cur - 1:cur], cur - 1)
            scores = _apply(procs, seqs[:, :cur], logits)
            if gen.output_scores:
                step_scores.append(scores)
            if gen.do_sample:
                tokens = torch.multinomial(F.softmax(scores, -1), 1, generator=generator)[:, 0]
            else:
                tokens = scores.argmax(-1)
            if eos is not None:
                tokens = torch.where(unfinished, tokens, pad)
                finished_now = unfinished & (tokens == eos)
                done_at.masked_fill_(finished_now, cur + 1)
                unfinished &= ~finished_now
            seqs[:, cur] = tokens
            if eos is not None and cur % check_every == 0 and not bool(unfinished.any()):
                break
        length = int(done_at.max()) if eos is not None else gen.max_length
        return seqs[:, :length], step_scores[:length - 1]

    def _beam_search(self, gen, encoder_states, encoder_mask, procs, generator, cuda_graph=True):
        """The reference's vectorized beam search: 2 * num_beams candidates per step, finished hypotheses
        scored by sum(log p) / generated_length ** length_penalty, and its early-stopping rules."""
        nb, max_len, lp, early = gen.num_beams, gen.max_length, gen.length_penalty, gen.early_stopping
        batch = encoder_states.shape[0]
        step, kv = self._decoder_cache(encoder_states, encoder_mask, max_len, nb, cuda_graph)
        device = encoder_states.device
        pad = gen.pad_token_id if gen.pad_token_id is not None else 0
        eos = gen.eos_token_id
        keep = 2 * nb  # candidates per step: enough to continue num_beams beams even if num_beams end with EOS
        top_nb = torch.arange(keep, device=device) < nb

        running = torch.full((batch, nb, max_len), pad, dtype=torch.long, device=device)
        running[:, :, 0] = gen.decoder_start_token_id
        finished = running.clone()
        running_scores = torch.zeros(batch, nb, device=device)
        running_scores[:, 1:] = -1e9  # only the first beam is live at the start
        finished_scores = torch.full((batch, nb), -1e9, device=device)
        finished_len = torch.ones(batch, nb, dtype=torch.long, device=device)
        is_finished = torch.zeros(batch, nb, dtype=torch.bool, device=device)
        can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
        batch_offset = torch.arange(batch, device=device)[:, None] * nb
        step_scores = []
        cur = 1
        while True:
            flat = running[:, :, :cur].reshape(batch * nb, cur)
            logits = step(flat[:, -1:], cur - 1)
            log_probs = _apply(procs, flat, F.log_softmax(logits, -1))
            if gen.output_scores:
                step_scores.append(log_probs)
            vocab = log_probs.shape[-1]
            totals = (log_probs.view(batch, nb, vocab) + running_scores[:, :, None]).view(batch, nb * vocab)

            # c. the best `keep` continuations over all beams
            if gen.do_sample:
                picked = torch.multinomial(F.softmax(totals, -1), keep, generator=generator)
                cand_scores = totals.gather(1, picked)
                cand_scores, order = cand_scores.sort(-1, descending=True)
                picked = picked.gather(1, order)
            else:
                cand_scores, picked = torch.topk(totals, keep)
            source = picked // vocab
            cand = running.gather(1, source[:, :, None].expand(-1, -1, max_len)).clone()
            cand[:, :, cur] = picked % vocab
            # d. which candidates end here (EOS or the length limit)
            if cur + 1 >= max_len:
                ends = torch.ones(batch, keep, dtype=torch.bool, device=device)
            elif eos is not None:
                ends = cand[:, :, cur] == eos
            else:
                ends = torch.zeros(batch, keep, dtype=torch.bool, device=device)

            # e. the best num_beams unfinished candidates continue
            live_scores = cand_scores + ends.float() * -1.0e9
            nxt = torch.topk(live_scores, nb)[1]
            running = cand.gather(1, nxt[:, :, None].expand(-1, -1, max_len))
            running_scores = live_scores.gather(1, nxt)
            parent = source.gather(1, nxt)

            # f. finished candidates among the top num_beams join the finished set if they score better
            just_finished = ends & top_nb[None, :]
            scored = cand_scores / ((cur + 1 - 1) ** lp)
            full = is_finished.all(-1, keepdim=True) & (early is True)
            scored = scored + full.float() * -1.0e9
            scored = scored + (~can_improve).float() * -1.0e9
            scored = scored + (~just_finished) * -1.0e9
            merged_scores = torch.cat([finished_scores, scored], 1)
            best = torch.topk(merged_scores, nb)[1]
            finished = torch.cat([finished, cand], 1).gather(1, best[:, :, None].expand(-1, -1, max_len))
            finished_scores = merged_scores.gather(1, best)
            finished_len = torch.cat([finished_len, torch.full_like(cand_scores, cur + 1, dtype=torch.long)],
                                     1).gather(1, best)
            is_finished = torch.cat([is_finished, just_finished], 1).gather(1, best)

            # g. reorder the self-attention cache to the surviving beams, then the stopping rules
            rows = (parent + batch_offset).view(-1)
            kv[..., :cur, :] = kv[..., :cur, :].index_select(2, rows)
            cur += 1
            best_len = (max_len - 1) if (early == "never" and lp > 0.0) else (cur - 1)
            best_running = running_scores[:, :1] / (best_len**lp)
            worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], -1.0e9)
            can_improve = can_improve & (best_running > worst_finished).any(-1, keepdim=True)
            go_on = bool(can_improve.any()) and not (early is True and bool(is_finished.all())) \
                and not bool(ends.all())
            if not go_on:
                break

        k = gen.num_return_sequences
        lengths = finished_len[:, :k].reshape(-1)
        sequences = finished[:, :k].reshape(batch * k, max_len)[:, : int(lengths.max())]
        return sequences, finished_scores[:, :k].reshape(-1), step_scores
