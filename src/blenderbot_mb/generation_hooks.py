"""What `generate()` calls on the host while it decodes: the streamer, stopping criteria, stop strings,
the time limit, and the recorder of per-step scores. Framework-free; the search reaches it through
`ArrayOps.host_call`, which under a compiled loop is the framework's host callback.

Streamer protocol (transformers' `TextStreamer` / `TextIteratorStreamer`, which work unchanged at batch 1):
`put(token_ids)` with an int64 NumPy array [rows, new]: first the decoder prompt (the start token; streamers
made with `skip_prompt=True` drop it), then the tokens each step makes final; `end()` once at the end.
Greedy and sampling put one token per row per step ([rows, 1]; rows that finished get the pad id). Beam search
puts, per input, the tokens that no surviving hypothesis can change any more: the prefix shared by every running
beam and the best finished hypothesis (the only finished one that can still be returned first), or all of
the best finished one once no running beam can beat it (a step may put several tokens, or none); at the end,
the rest of the best sequence. Each input advances on its own: a call is as wide as the row with the most new
tokens, and the other rows are padded with the pad id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, InputError
from .validation import short


def host_array(x) -> np.ndarray:
    """A host array from NumPy, PyTorch (any device; bfloat16, which NumPy lacks, as float32), TF eager or JAX
    values."""
    if hasattr(x, "detach"):
        x = x.detach()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).cpu()
    return np.asarray(x)


@dataclass
class Hooks:
    """The host-side hooks of one generate() call (None when the call has none: the loop stays pure)."""

    streamer: Any = None
    stopping_criteria: tuple = ()  # callables (input_ids [N, cur_len], scores) -> bool [N] or bool
    stop_strings: tuple = ()
    tokenizer: Any = None  # decodes for stop_strings
    max_time: float | None = None
    record_scores: bool = False
    record_logits: bool = False
    record_attentions: bool = False
    record_hidden_states: bool = False
    decoder_layers: int = 0
    encoder_layers: int = 0
    prompt_length: int = 1
    pad_token_id: int = 0
    encoder_width: int | None = None  # the caller's input length (a backend may pad its encoder inputs)
    recorded: list = field(default_factory=list)  # each step's scores (output_scores)
    recorded_logits: list = field(default_factory=list)  # each step's raw logits (output_logits)
    recorded_layers: list = field(default_factory=list)  # each step's (self-attentions, cross-attentions, hidden)
    encoder_attentions: tuple | None = None
    encoder_hidden_states: tuple | None = None
    started: float = field(default_factory=time.monotonic)
    _sent: np.ndarray | None = None  # beam search: tokens already put, per input

    @classmethod
    def from_kwargs(cls, kwargs: dict, *, prompt_length: int, pad_token_id: int, record_scores: bool,
                    record_logits: bool = False, record_attentions: bool = False, record_hidden_states: bool = False,
                    decoder_layers: int = 0, encoder_layers: int = 0) -> Hooks | None:
        """Pop the hook arguments out of generate()'s kwargs; None when there are none."""
        streamer = kwargs.pop("streamer", None)
        criteria = kwargs.pop("stopping_criteria", None) or ()
        stop_strings = kwargs.pop("stop_strings", None) or ()
        tokenizer = kwargs.pop("tokenizer", None)
        max_time = kwargs.pop("max_time", None)
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if stop_strings and tokenizer is None:
            raise ConfigError("stop_strings needs the tokenizer: generate(..., stop_strings=[...], tokenizer=tok)")
        if max_time is not None and not (isinstance(max_time, (int, float)) and max_time > 0):
            raise ConfigError(f"max_time must be a positive number of seconds, got {max_time!r}")
        if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(
                getattr(streamer, "end", None))):
            raise ConfigError("streamer must have put(token_ids) and end() methods (transformers' streamer protocol)")
        if not any((streamer, criteria, stop_strings, max_time, record_scores, record_logits, record_attentions,
                    record_hidden_states)):
            return None
        return cls(streamer=streamer, stopping_criteria=tuple(criteria), stop_strings=tuple(stop_strings),
                   tokenizer=tokenizer, max_time=max_time, record_scores=record_scores, record_logits=record_logits,
                   record_attentions=record_attentions, record_hidden_states=record_hidden_states,
                   decoder_layers=decoder_layers, encoder_layers=encoder_layers, prompt_length=prompt_length,
                   pad_token_id=pad_token_id)

    def arguments(self) -> list:
        """The generate() arguments that asked for these hooks, for error messages."""
        given = {"streamer": self.streamer is not None, "stopping_criteria": bool(self.stopping_criteria),
                 "stop_strings": bool(self.stop_strings), "max_time": self.max_time is not None,
                 "output_scores": self.record_scores, "output_logits": self.record_logits,
                 "output_attentions": self.record_attentions, "output_hidden_states": self.record_hidden_states}
        return [name for name, on in given.items() if on]

    @property
    def stops(self) -> bool:
        """Whether the loop must ask the host which rows stop."""
        return bool(self.stopping_criteria or self.stop_strings or self.max_time is not None)

    # ------------------------------------------------------------------ per step
    def record(self, scores) -> None:
        self.recorded.append(scores)

    def record_raw(self, logits) -> None:
        self.recorded_logits.append(logits)

    def record_layers(self, index, *arrays) -> None:
        """A decoder step's per-layer outputs (`search.record_layers`), as transformers gives them: the
        self-attention over the positions so far (index + 1 of them; a static cache holds more), the
        cross-attention over the caller's input length, float32 host arrays."""
        index, layers, at = int(host_array(index)), self.decoder_layers, 0
        arrays = [host_array(a).astype(np.float32, copy=False) for a in arrays]
        attentions = cross = hidden = ()
        if self.record_attentions:
            attentions = tuple(a[..., :index + 1] for a in arrays[:layers])
            cross = tuple(a[..., :self.encoder_width] for a in arrays[layers:2 * layers])
            at = 2 * layers
        if self.record_hidden_states:
            hidden = tuple(arrays[at:at + layers + 1])
        self.recorded_layers.append((attentions, cross, hidden))

    def record_encoder_arrays(self, *arrays) -> None:
        """`record_encoder` with the attentions and hidden states in one flat list (from a compiled loop)."""
        n = self.encoder_layers if self.record_attentions else 0
        self.record_encoder(arrays[:n], arrays[n:])

    def record_encoder(self, attentions, hidden_states) -> None:
        """The encoder's per-layer attentions and hidden states of the inputs (one row per input), float32 host
        arrays cut to the caller's input length."""
        width = self.encoder_width
        if self.record_attentions:
            self.encoder_attentions = tuple(host_array(a).astype(np.float32, copy=False)[..., :width, :width]
                                            for a in attentions)
        if self.record_hidden_states:
            self.encoder_hidden_states = tuple(host_array(h).astype(np.float32, copy=False)[:, :width]
                                               for h in hidden_states)

    def should_stop(self, tokens, cur_len, scores) -> np.ndarray:
        """[N] bool: rows whose decoder tokens `tokens[:, :cur_len]` meet a stopping rule."""
        cur_len = int(host_array(cur_len))
        ids = tokens[:, :cur_len]
        rows = ids.shape[0]
        out = np.zeros(rows, bool)
        for criterion in self.stopping_criteria:
            said = np.asarray(host_array(criterion(ids, scores)))
            if said.dtype != np.bool_ or said.size not in (1, rows):
                raise InputError(f"a stopping criterion returns True/False, or one bool per row ({rows}); "
                                 f"{getattr(criterion, '__name__', type(criterion).__name__)} returned "
                                 f"{short(said.tolist())}")
            out |= np.broadcast_to(said.reshape(-1), (rows,))
        if self.stop_strings:
            for i, row in enumerate(host_array(ids)[:, self.prompt_length:]):
                text = self.tokenizer.decode(row.tolist())
                out[i] |= any(s in text for s in self.stop_strings)
        if self.max_time is not None and time.monotonic() - self.started > self.max_time:
            out[:] = True
        return out

    def put_prompt(self, prompt) -> None:
        if self.streamer is not None:
            self.streamer.put(host_array(prompt).astype(np.int64))

    def put_tokens(self, tokens) -> None:
        """Greedy and sampling: this step's token of every row [N]."""
        self.streamer.put(host_array(tokens).astype(np.int64).reshape(-1, 1))

    def put_beams(self, running, sequences, lengths, finished, improvable, cur_len) -> None:
        """Beam search: put what became final. running/sequences [B, K, L] (finished ones best first, `lengths`
        [B, K] long), finished [B, K] bool, improvable [B, 1] bool: a running beam can still beat a finished one."""
        running, sequences, finished = host_array(running), host_array(sequences), host_array(finished)
        improvable, cur_len = host_array(improvable).reshape(-1), int(host_array(cur_len))
        rows, final = running[:, 0, :cur_len].copy(), np.empty(running.shape[0], int)
        for b in range(running.shape[0]):
            if not improvable[b] and finished[b, 0]:  # the search of this input is over
                rows[b], final[b] = sequences[b, 0, :cur_len], int(host_array(lengths)[b, 0])
                continue
            hyps = running[b, :, :cur_len]
            if finished[b, 0]:
                hyps = np.concatenate([hyps, sequences[b, :1, :cur_len]], axis=0)
            same = np.all(hyps == hyps[:1], axis=0)
            final[b] = cur_len if same.all() else int(np.argmin(same))
        self._put_rows(rows, final)

    def _put_rows(self, rows, upto) -> None:
        """Put rows[b, sent[b]:upto[b]] for every input b, right-padded to one width."""
        if self._sent is None:
            self._sent = np.full(rows.shape[0], self.prompt_length)
        count = np.maximum(np.asarray(upto) - self._sent, 0)
        if count.max() == 0:
            return
        out = np.full((rows.shape[0], int(count.max())), self.pad_token_id, np.int64)
        for b, (start, n) in enumerate(zip(self._sent, count, strict=True)):
            out[b, :n] = rows[b, start:start + n]
        self.streamer.put(out)
        self._sent = self._sent + count

    def finish(self, sequences, num_beams: int, length) -> None:
        """The end of the search: beam search puts the rest of each input's best sequence ([B, L], `length`
        columns used); end()."""
        if self.streamer is None:
            return
        if num_beams > 1:
            best = host_array(sequences)
            self._put_rows(best, np.full(best.shape[0], int(host_array(length))))
        self.streamer.end()


class HookSlot:
    """A stable stand-in for the hooks of the call in progress: a compiled loop (JAX) keeps calling the
    methods of this object, which pass them on to `current`, set by each generate() call. An exception a hook
    raises is kept in `failure` as well: the runtime hands it back wrapped in its own error, and the call
    raises the original instead."""

    current: Hooks | None = None
    failure: BaseException | None = None

    def _call(self, name: str, args):
        try:
            return getattr(self.current, name)(*args)
        except BaseException as e:
            if self.failure is None:
                self.failure = e
            e.raised_by_hook = True  # (the caller gets it: `from_hook` keeps runtimes from logging it too)
            raise

    def record(self, *args):
        return self._call("record", args)

    def record_raw(self, *args):
        return self._call("record_raw", args)

    def record_layers(self, *args):
        return self._call("record_layers", args)

    def record_encoder_arrays(self, *args):
        return self._call("record_encoder_arrays", args)

    def should_stop(self, *args):
        return self._call("should_stop", args)

    def put_prompt(self, *args):
        return self._call("put_prompt", args)

    def put_tokens(self, *args):
        return self._call("put_tokens", args)

    def put_beams(self, *args):
        return self._call("put_beams", args)

    def finish(self, *args):
        return self._call("finish", args)


def from_hook(record) -> bool:
    """A logging filter: False for a record of an exception a hook raised (JAX logs a failed host callback with
    its traceback before it fails the call, and generate() raises the exception itself)."""
    return not (record.exc_info and getattr(record.exc_info[1], "raised_by_hook", False))
