"""The decoding engine: requests queue up, and one worker thread decodes compatible ones together.

Dynamic batching with a bounded wait: the worker takes the oldest waiting request and every other waiting
request with the same generation settings (up to `max_batch`), waiting at most `max_wait_ms` after the
oldest one arrived for more to come. The batch's encoder inputs are right-padded with an attention mask
(Blenderbot's encoder positions count from 0 at the first token, so right padding leaves every real token
where it is) and go through one call of the backend's `generate`, with one seed per request (its own, or a
fresh random one): each sampled reply draws from its own random stream, so a seeded request gets the reply
it gets alone, whatever else is in its batch.

Why not continuous batching (new requests joining a running decode as others finish): the backends'
`generate` runs a whole batch from the encoder to the last token in one call, with its self-attention cache
allocated for that batch, so a request can only start with a new call. With short chat replies and a
bounded wait, a new request waits at most for one running batch to finish.

The engine knows nothing of HTTP or asyncio: each job reports to its `on_event(kind, payload)` callback,
called from the worker thread: ("delta", (choice, text)) as text becomes known, then ("done", Result) or
("error", exception). The deltas of one choice add up to its final text. `serve.process.ProcessEngine`
runs this engine in a process of its own, behind the same interface.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from ..conversation import build_conversation_ids
from ..errors import BlenderbotError

logger = logging.getLogger(__name__)
_numbers = itertools.count()


@dataclass
class Result:
    texts: list[str]  # one per choice, decoded, special tokens skipped (leading space kept)
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    tokens: list[list[int]] = field(default_factory=list)  # each choice's reply tokens (EOS included, if any)
    # with Job.logprobs set: each choice's OpenAI `logprobs.content` entries, one per token of its text, and where
    # each token's text starts in the choice's text (to cut them with the text at a stop string)
    logprobs: list[list[dict]] | None = None
    logprob_offsets: list[list[int]] | None = None


@dataclass(eq=False)
class Job:
    ids: list[int]  # encoder input, already truncated to the model's positions
    kwargs: dict  # generation settings for the backend's generate(), and its "seed" if the client gave one
    n: int  # choices (num_return_sequences)
    max_new_tokens: int
    on_event: Callable[[str, object], None]
    # the tokens of text a choice may have (max_tokens) when generate() runs one more for the model's forced EOS
    text_tokens: int | None = None
    stream: bool = False
    rows_per_input: int = 1  # rows generate() streams per input: n, or 1 with beam search
    stops: tuple[str, ...] = ()  # the client's stop strings: decoding of the job ends once each choice holds one
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, and the k likeliest at each position
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    number: int = field(default_factory=lambda: next(_numbers))  # names the job between processes
    seed: int = field(init=False)  # the seed of this request's random streams
    key: tuple = field(init=False)  # jobs with equal keys can share one generate() call

    def __post_init__(self):
        given = self.kwargs.get("seed")
        self.seed = secrets.randbits(64) if given is None else given
        self.kwargs = {k: v for k, v in self.kwargs.items() if k != "seed"}
        self.key = tuple(sorted(self.kwargs.items()))

    def counted(self, rows: list[list[int]]) -> int:
        """usage's completion tokens of the choices' token rows: a forced EOS after max_tokens is not counted."""
        most = self.max_new_tokens if self.text_tokens is None else self.text_tokens
        return sum(min(len(r), most) for r in rows)


class RequestSide:
    """What both engines do on the request side, from the model's tokenizer and configs alone: encode a
    conversation and validate settings. Subclasses set `tokenizer`, `config`, `generation_config`."""

    failure: str | None = None  # why the engine can take no more work (a dead decoder process), else None
    resolved: dict[tuple, object]  # settings -> resolve()'s result (a few distinct ones in practice)

    def encode(self, messages: list[dict]) -> list[int]:
        """Encoder ids in the core conversation format, the oldest turns cut to fit, persona lines kept."""
        with warnings.catch_warnings():  # long histories are cut on purpose; no warning per request
            warnings.simplefilter("ignore", UserWarning)
            return build_conversation_ids(self.tokenizer, messages, keep_persona=True,
                                          max_length=self.config.max_position_embeddings)

    def resolve(self, kwargs: dict):
        """The merged, validated settings (ConfigError names a bad one) before a job is queued."""
        key = tuple(sorted((k, v) for k, v in kwargs.items() if k != "seed"))  # seed: not a setting
        if key not in self.resolved:
            if len(self.resolved) >= 256:
                self.resolved.clear()
            self.resolved[key] = self.generation_config.resolve(self.config, **dict(key))
        return self.resolved[key]


class Engine(RequestSide):
    """Owns a loaded model (`blenderbot_mb.cli.Bot`) and the worker thread that decodes for it.

    Hooks for a host process (`serve.process`), no-ops by default: `observe_batch(size, tokens, seconds)`
    after each batch, `on_batch(jobs)` when a batch starts, and `flush()` after each decoding step and
    batch, once the step's events are out."""

    def __init__(self, bot, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 observe_batch: Callable[[int, int, float], None] | None = None):
        self.bot, self.folder = bot, bot.folder
        self.tokenizer, self.config, self.generation_config = bot.tokenizer, bot.config, bot.model.generation_config
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.observe_batch = observe_batch or (lambda size, tokens, seconds: None)
        self.on_batch: Callable[[list[Job]], None] = lambda jobs: None
        self.flush: Callable[[], None] = lambda: None
        self.pending: list[Job] = []
        self.resolved = {}
        self.running = 0  # jobs in the batch being decoded
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="blenderbot-mb-decoder", daemon=True)

    # ------------------------------------------------------------------ the request side
    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        with self.cond:
            if len(self.pending) >= self.max_queue:
                return False
            self.pending.append(job)
            if len(self.pending) == 1 or len(self.pending) >= self.max_batch:  # the worker may be idle, or a
                self.cond.notify_all()  # batch full; otherwise it wakes at its deadline (no wake-up per request)
        return True

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits; a running batch skips it when streaming."""
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
            self.cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        if not self.thread.is_alive() and not self.stopping:
            self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.on_batch(batch)
                self.flush()
                self._run(batch)
            finally:
                with self.cond:
                    self.running = 0
                self.flush()

    def _next_batch(self) -> list[Job] | None:
        with self.cond:
            while True:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if not self.pending:
                    return None  # stopping, nothing left
                first = self.pending[0]
                deadline = first.arrived + self.max_wait
                while True:
                    batch = [j for j in self.pending if j.key == first.key][: self.max_batch]
                    left = deadline - time.monotonic()
                    if first.cancelled or len(batch) >= self.max_batch or left <= 0 or self.stopping:
                        break
                    self.cond.wait(left)
                if first.cancelled:
                    continue
                for job in batch:
                    self.pending.remove(job)
                self.running = len(batch)
                return batch

    def _run(self, batch: list[Job]) -> None:
        tokenizer, n = self.bot.tokenizer, batch[0].n
        length = max(len(j.ids) for j in batch)
        pad = self.bot.config.pad_token_id
        inputs = [j.ids for j in batch] + [[self.bot.config.eos_token_id]] * (self._rows(len(batch)) - len(batch))
        input_ids = [ids + [pad] * (length - len(ids)) for ids in inputs]  # [rows, length], right-padded
        mask = [[1] * len(ids) + [0] * (length - len(ids)) for ids in inputs]
        eos = self.bot.config.eos_token_id
        seeds = [j.seed for j in batch] + [0] * (len(inputs) - len(batch))
        streamer = _Streamer(batch, tokenizer, eos, self.flush) if any(j.stream or j.stops for j in batch) else None
        start = time.perf_counter()
        try:
            sequences = self._generate(input_ids, mask, dict(batch[0].kwargs, seed=seeds), streamer)  # [rows * n, L]
        except Exception as e:  # noqa: BLE001 - reported to every client of the batch; the worker goes on
            if isinstance(e, _Abandoned) or all(j.cancelled or (streamer and i in streamer.early)
                                                for i, j in enumerate(batch)):
                if streamer is not None and streamer.early:  # every job left or ended at its stop strings
                    self.observe_batch(len(batch), sum(r.completion_tokens for r in streamer.early.values()),
                                       time.perf_counter() - start)
                    self._answer([(batch[i], result) for i, result in streamer.early.items()])
                return  # nobody listens any more (under a compiled loop _Abandoned arrives wrapped)
            if not isinstance(e, BlenderbotError):  # a bug, not the client's input: its traceback in the log
                logger.exception("generate() failed for a batch of %d", len(batch))
            for job in batch:
                job.on_event("error", e)
            return
        seconds = time.perf_counter() - start
        total, results = 0, []
        for i, job in enumerate(batch):
            if streamer is not None and i in streamer.early:  # ended at its stop strings
                total += streamer.early[i].completion_tokens
                results.append((job, streamer.early[i]))
                continue
            rows = [_reply_tokens(seq, eos, pad) for seq in sequences[i * n:(i + 1) * n]]
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
            if streamer is not None:
                streamer.finish(i, texts)
            count = job.counted(rows)
            total += count
            reasons = ["length" if len(r) >= job.max_new_tokens else "stop" for r in rows]
            results.append((job, Result(texts=texts, finish_reasons=reasons, prompt_tokens=len(job.ids),
                                        completion_tokens=count, batch_size=len(batch), tokens=rows)))
        self.observe_batch(len(batch), total, seconds)  # counted before any reply is out: a client that has
        self._answer(results)  # its reply finds its batch in the metrics

    def _answer(self, results: list[tuple[Job, Result]]) -> None:
        """Send each job its result, with the log-probabilities of its tokens where it asked for them."""
        wanted = [(job, result) for job, result in results if job.logprobs is not None and not job.cancelled]
        if wanted:
            try:
                self._add_logprobs(wanted)
            except Exception as e:  # noqa: BLE001 - those jobs get the error; the others their replies
                if not isinstance(e, BlenderbotError):
                    logger.exception("scoring the replies of %d request(s) failed", len(wanted))
                failed = {id(job) for job, _ in wanted}
                for job, _ in wanted:
                    job.on_event("error", e)
                results = [(job, result) for job, result in results if id(job) not in failed]
        for job, result in results:
            job.on_event("done", result)

    def _add_logprobs(self, wanted: list[tuple[Job, Result]]) -> None:
        """Each choice's token log-probabilities under the model (`scoring`): one forward pass over the
        replies, in chunks of rows that bound the logits' memory."""
        from ..scoring import teacher_forcing

        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        rows = [(job, tokens) for job, result in wanted for tokens in result.tokens]
        top = max(job.logprobs for job, _ in wanted)
        width = max(1, max(len(tokens) for _, tokens in rows))
        step = max(1, SCORE_VALUES // (width * self.config.vocab_size))
        scored = []
        for first in range(0, len(rows), step):
            part = rows[first:first + step]
            start = self.resolve(part[0][0].kwargs).decoder_start_token_id  # the same for every setting
            decoder_ids, targets = teacher_forcing([tokens for _, tokens in part], start, pad)
            length = max(len(job.ids) for job, _ in part)
            input_ids = [job.ids + [pad] * (length - len(job.ids)) for job, _ in part]
            mask = [[1] * len(job.ids) + [0] * (length - len(job.ids)) for job, _ in part]
            chosen, values, ids = self._score(input_ids, mask, decoder_ids, targets, top)
            scored.extend(zip(chosen, values, ids, strict=True))
        row = 0
        for job, result in wanted:
            result.logprobs, result.logprob_offsets = [], []
            for tokens in result.tokens:
                chosen, values, ids = scored[row]
                row += 1
                entries, offsets = logprob_entries(self.tokenizer, tokens, eos, chosen, values[:, :job.logprobs],
                                                   ids[:, :job.logprobs])
                result.logprobs.append(entries)
                result.logprob_offsets.append(offsets)

    def _score(self, input_ids, mask, decoder_ids, targets, top: int):
        """`scoring.token_log_probs` of the model's logits for these encoder and decoder inputs."""
        from ..scoring import token_log_probs

        input_ids, mask, decoder_ids = self._arrays(input_ids, mask, decoder_ids.tolist())
        with self._no_grad():  # (the models' forward passes run in inference mode by default: no dropout)
            logits = self.bot.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        return token_log_probs(self._ops(), logits, targets, top)

    def _rows(self, size: int) -> int:
        """Rows to decode for `size` requests: on CUDA a power of two, at least 8 (filler rows are dropped),
        since the PyTorch backend replays a CUDA graph captured per batch shape and keeps a few of them; a
        memory-bound decoder step costs about the same for 1 row as for 8."""
        if self.bot.backend != "torch" or self.bot.model.device.type != "cuda":
            return size
        return min(max(8, 1 << (size - 1).bit_length()), max(self.max_batch, size))

    def _generate(self, input_ids, mask, kwargs, streamer) -> list[list[int]]:
        """The backend's generate() on a padded batch; the sequences as lists of ints."""
        from ..cli import sequence_lists

        kwargs = dict(kwargs)
        if streamer is not None:
            kwargs["streamer"] = streamer
        input_ids, mask = self._arrays(input_ids, mask)
        with self._no_grad():
            out = self.bot.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return sequence_lists(out)

    def _arrays(self, *rows):
        """Lists of int rows as the backend's arrays (on the model's device)."""
        backend = self.bot.backend
        if backend == "torch":
            import torch

            return tuple(torch.tensor(r, dtype=torch.long, device=self.bot.model.device) for r in rows)
        if backend == "tf":
            import tensorflow as tf

            return tuple(tf.constant(r, dtype=tf.int32) for r in rows)
        import jax.numpy as jnp

        return tuple(jnp.array(r, dtype=jnp.int32) for r in rows)

    def _no_grad(self):
        import contextlib

        if self.bot.backend == "torch":
            import torch

            return torch.no_grad()
        return contextlib.nullcontext()

    def _ops(self):
        """The backend's ArrayOps (for the core's scoring)."""
        if self.bot.backend == "torch":
            from ..torch.generation import TorchOps

            return TorchOps(self.bot.model.device)
        if self.bot.backend == "tf":
            from ..tf.generation import TFOps

            return TFOps()
        from ..flax.generation import JaxOps

        return JaxOps()


SCORE_VALUES = 1 << 25  # logits held at once when scoring replies (128 MiB of float32)


def logprob_entries(tokenizer, tokens: list[int], eos: int, chosen, values, ids) -> tuple[list[dict], list[int]]:
    """OpenAI's `logprobs.content` for one reply: an entry per token of its text (a final EOS has none), each
    with its text, log-probability, bytes and the likeliest tokens at its position; and where each token's
    text starts in the reply's text (decoded as the reply is)."""
    from ..scoring import floor

    def described(token: int, logprob: float) -> dict:
        data = tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": floor(logprob), "bytes": list(data)}

    count = len(tokens) - 1 if tokens and tokens[-1] == eos else len(tokens)
    entries, offsets = [], []
    for t in range(count):
        entry = described(tokens[t], chosen[t])
        entry["top_logprobs"] = [described(int(i), v) for i, v in zip(ids[t], values[t], strict=True)]
        entries.append(entry)
        offsets.append(len(tokenizer.decode(tokens[:t], skip_special_tokens=True)))
    return entries, offsets


def _reply_tokens(sequence: list[int], eos: int, pad: int) -> list[int]:
    """The generated tokens of one output row: after the start token, up to and including EOS."""
    out = []
    for token in sequence[1:]:
        out.append(token)
        if token == eos:
            break
    while out and out[-1] == pad and pad != eos:
        out.pop()
    return out


class _Abandoned(Exception):
    """Every client of a streaming batch went away, or has its reply: stop decoding it."""


class _Streamer:
    """Receives generate()'s tokens (the streamer protocol of `blenderbot_mb.generation_hooks`: `put(ids)` with
    [rows, new] ids, the first call the start tokens, then `end()`) and sends each job the new text of each
    choice. Greedy and sampling give one row per choice; beam search one row per input (its best hypothesis,
    as far as no surviving beam can change it), whose other choices arrive whole at the end. Text is sent once
    it is complete (a partial UTF-8 character waits for its next byte).

    Text is decoded incrementally, as text-generation servers do: each step decodes only the tokens since the
    last text sent (and the few before them, for context), so a step costs the same at the 100th token as at
    the first.

    A job with stop strings ends early, once each of its choices holds one (or its EOS): its reply is made from
    the tokens so far (`early`; the engine sends it with the batch's), and its rows are no longer followed; when
    no job is left, the batch stops. Only where the streamed text is each choice's final text so far: greedy and sampling, and beam
    search of one choice (whose streamed text no surviving beam can change)."""

    def __init__(self, batch: list[Job], tokenizer, eos: int, flush: Callable[[], None] = lambda: None):
        self.batch, self.tokenizer, self.eos, self.flush = batch, tokenizer, eos, flush
        self.rows = [(job, c) for job in batch for c in range(job.rows_per_input)]
        self.tokens = {key: [] for key in self.rows}
        self.offsets = {key: (0, 0) for key in self.rows}  # tokens[start:sent] decode to the end of the text sent
        self.sent = {(id(job), c): "" for job in batch for c in range(job.n)}
        self.prompt = True
        self.early: dict[int, Result] = {}  # batch index -> the reply of a job that ended at its stop strings

    def put(self, token_ids) -> None:
        if self.prompt:  # the decoder start tokens
            self.prompt = False
            return
        if all(job.cancelled or i in self.early for i, job in enumerate(self.batch)):
            raise _Abandoned
        ended = {id(self.batch[i]) for i in self.early}
        for (job, c), new in zip(self.rows, token_ids.tolist()[:len(self.rows)], strict=True):  # no filler rows
            tokens = self.tokens[job, c]
            if job.cancelled or id(job) in ended or (tokens and tokens[-1] == self.eos):
                continue
            for token in new:
                tokens.append(token)
                if token == self.eos:
                    break
            start, sent = self.offsets[job, c]
            before = self.tokenizer.decode(tokens[start:sent], skip_special_tokens=True)
            after = self.tokenizer.decode(tokens[start:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.offsets[job, c] = (sent, len(tokens))
                self._send(job, c, self.sent[id(job), c] + after[len(before):])
        for i, job in enumerate(self.batch):
            if job.stops and job.rows_per_input == job.n and i not in self.early and not job.cancelled:
                self._end_at_stops(i, job)
        self.flush()  # the step's deltas leave together

    def _end_at_stops(self, i: int, job: Job) -> None:
        """Answer job `i` now if each of its choices holds a stop string or has ended."""
        rows = [self.tokens[job, c] for c in range(job.n)]
        if not all((r and r[-1] == self.eos) or any(stop in self.sent[id(job), c] for stop in job.stops)
                   for c, r in enumerate(rows)):
            return
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        for c, text in enumerate(texts):
            self._send(job, c, text)
        # the reasons as at a batch's end; the app makes a choice cut at a stop string "stop"
        reasons = ["length" if len(r) >= job.max_new_tokens else "stop" for r in rows]
        self.early[i] = Result(texts=texts, finish_reasons=reasons, prompt_tokens=len(job.ids),
                               completion_tokens=job.counted(rows), batch_size=len(self.batch),
                               tokens=[list(r) for r in rows])

    def end(self) -> None:
        pass

    def finish(self, index: int, texts: list[str]) -> None:
        """The final texts of job `index`: send whatever the steps did not."""
        job = self.batch[index]
        for c, text in enumerate(texts):
            self._send(job, c, text)

    def _send(self, job: Job, c: int, text: str) -> None:
        sent = self.sent[id(job), c]
        if job.cancelled or not text.startswith(sent) or len(text) == len(sent):
            return
        self.sent[id(job), c] = text
        if job.stream:  # a job followed for its stop strings alone is answered whole
            job.on_event("delta", (c, text[len(sent):]))
