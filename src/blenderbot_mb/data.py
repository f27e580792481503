"""Training data in the model's own format, once for every backend.

Files (one example or one conversation per line; blank lines are skipped):

- JSON Lines (`.jsonl`, `.ndjson`, `.json`): `{"context": "Hi!" or ["turn", ...], "reply": "...", "persona": [...]}`
  (persona optional), or a whole conversation `{"turns": ["turn", ...], "persona": [...]}`.
- TSV (any other name): `context<TAB>reply`; a line with more tabs is a whole conversation, one turn per
  field.

A conversation of n turns gives n - 1 examples: every turn after the first is a reply to the turns before
it. An example is encoded as `chat` and `generate` build inputs (`blenderbot_mb.conversation`): the turn
just before the reply is the user's, the ones before alternate, assistant turns carry the leading space a
generated reply has, persona lines come first, and the ids are cut from the left to the model's 128
positions so the newest turns survive. The reply becomes the labels with a leading space, as the published
models generate it, closed by `</s>`; label padding is `training.IGNORE_INDEX`.

`TrainingData` reads a file once to check every line (a bad line raises `InputError` naming file and line,
or is counted and skipped) and keeps only each example's byte offset, so files larger than memory stream:
batches read their lines back by offset.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .conversation import conversation_text
from .errors import InputError
from .training import IGNORE_INDEX
from .validation import LIMITS_ENV, limit


@dataclass(frozen=True)
class Example:
    context: tuple[str, ...]  # turns, oldest first; the last one is the user's
    reply: str
    persona: tuple[str, ...] = ()

    def messages(self) -> list[dict]:
        """The context as chat messages: persona lines, then turns whose roles count back from the reply."""
        out = [{"role": "system", "content": p} for p in self.persona]
        n = len(self.context)
        for i, turn in enumerate(self.context):
            out.append({"role": "user" if (n - 1 - i) % 2 == 0 else "assistant", "content": turn})
        return out


def conversation_examples(turns, persona=()) -> list[Example]:
    """Every turn after the first as a reply to the turns before it."""
    turns, persona = tuple(turns), tuple(persona)
    return [Example(turns[:k], turns[k], persona) for k in range(1, len(turns))]


# ---------------------------------------------------------------------- parsing one line
def _strings(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise ValueError(f"{what} must be a non-empty string or a list of non-empty strings")
    return tuple(t.strip() for t in value)


def parse_line(line: str, jsonl: bool) -> list[Example]:
    """The examples of one line (none for a blank line); ValueError says what is wrong, also a turn, reply or
    persona line longer than the conversation format takes (`validation.LIMITS["turn_chars"]`)."""
    examples = _parse_line(line, jsonl)
    most = limit("turn_chars")
    for example in examples[-1:]:  # the last example holds every turn of the line
        for what, texts in (("a turn", example.context), ("the reply", (example.reply,)),
                            ("a persona line", example.persona)):
            longest = max((len(t) for t in texts), default=0)
            if longest > most:
                raise ValueError(f"{what} has {longest} characters, above the limit of {most} (set "
                                 f"{LIMITS_ENV}=turn_chars=N to raise it)")
    return examples


def _parse_line(line: str, jsonl: bool) -> list[Example]:
    if not line.strip():
        return []
    if not jsonl:
        fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        if len(fields) < 2 or not all(fields):
            raise ValueError("expected context<TAB>reply (or turns separated by tabs), each part non-empty")
        return conversation_examples(fields)
    line = line.rstrip("\r\n")  # (a column past the line's end is named as such, not as column 1 of the next)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.pos + 1})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    persona = _strings(record["persona"], "persona") if record.get("persona") else ()
    if "turns" in record:
        turns = _strings(record["turns"], "turns")
        if len(turns) < 2:
            raise ValueError("a conversation needs at least 2 turns")
        return conversation_examples(turns, persona)
    if "context" not in record or "reply" not in record:
        raise ValueError('expected "context" and "reply" (or "turns")')
    reply = record["reply"]
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError("reply must be a non-empty string")
    return [Example(_strings(record["context"], "context"), reply.strip(), persona)]


def is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json", ".ndjson"))


HEADERS = ({"context", "reply"}, {"context", "response"}, {"prompt", "response"}, {"input", "output"})


def _is_header(line: str) -> bool:
    """A tab-separated file's first line that names its columns (`context<TAB>reply` and the like)."""
    fields = [f.strip().lower() for f in line.rstrip("\r\n").split("\t")]
    return len(fields) == 2 and set(fields) in HEADERS


def _format_hint(data, number: int, raw: bytes) -> str:
    """What the file was read as, where its first line suggests another format (a JSON array, a CSV file)."""
    if number != 1:
        return ""
    start = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if data.jsonl and start == b"[":
        return (" (the file is read as JSON Lines, one object per line, because of its name; a JSON array can "
                "be turned into that with: jq -c '.[]' FILE > FILE.jsonl)")
    if not data.jsonl:
        return (" (the file is read as tab-separated context<TAB>reply lines, because its name does not end in "
                ".jsonl, .json or .ndjson)")
    return ""


class TrainingData:
    """The examples of one file, indexed by byte offset (checked in a first pass, read back on demand).

        >>> data = TrainingData("dialogues.jsonl")      # InputError on a malformed line, naming it
        >>> len(data), data[0]
    """

    def __init__(self, path: str, skip_bad_lines: bool = False):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise InputError(f"training data {self.path} is a folder; give a file (JSON Lines, or tab-separated)")
        if not os.path.isfile(self.path):
            raise InputError(f"training data {self.path} does not exist")
        self.jsonl = is_jsonl(self.path)
        self.bad_lines = 0
        offsets, subs = array.array("q"), array.array("i")  # 12 bytes an example: the file stays on disk
        with open(self.path, "rb") as f:
            offset, number = 0, 0
            for raw in f:
                number += 1
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                    if number == 1 and not self.jsonl and _is_header(text):
                        offset += len(raw)  # a spreadsheet's header row: a name for each column, no dialogue
                        continue
                    count = len(parse_line(text, self.jsonl))
                except (ValueError, UnicodeDecodeError) as e:
                    if not skip_bad_lines:
                        raise InputError(f"{self.path}, line {number}: {e}{_format_hint(self, number, raw)}. Fix "
                                         "the line, or pass --skip-bad-lines to count and skip it.") from None
                    self.bad_lines += 1
                    count = 0
                offsets.extend([offset] * count)
                subs.extend(range(count))
                offset += len(raw)
        if not offsets:
            raise InputError(f"{self.path} holds no training examples")
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.subs = np.frombuffer(subs, dtype=np.int32)
        self._file = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:  # for loader processes: the index travels, the open file does not
        return {**self.__dict__, "_file": None}

    def __getitem__(self, i: int) -> Example:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115  (kept open while batches are read)
        self._file.seek(int(self.offsets[i]))
        offset = int(self.offsets[i])  # the file's first line may start with a byte order mark (Windows editors)
        return parse_line(self._file.readline().decode("utf-8-sig" if offset == 0 else "utf-8"),
                          self.jsonl)[int(self.subs[i])]

    def texts(self):
        """Every turn and reply, for training a tokenizer (streams the file)."""
        with open(self.path, encoding="utf-8-sig") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    for example in parse_line(line, self.jsonl):
                        yield from example.persona
                        yield from example.context
                        yield example.reply

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------- encoding
@contextlib.contextmanager
def _quiet_truncation():
    """Left truncation of long histories is the rule here, not news: no warning per example."""
    logger = logging.getLogger("blenderbot_mb.conversation")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _longest_token(tokenizer) -> int:
    """The most bytes one token of the vocabulary stands for (cached on the tokenizer)."""
    longest = getattr(tokenizer, "_bbmb_longest_token", None)
    if longest is None:
        longest = max(len(token) for token in tokenizer.get_vocab())  # byte-level: one character a byte
        tokenizer._bbmb_longest_token = longest
    return longest


def _newest_turns(example: Example, budget: int) -> Example:
    """The example without the oldest turns that cannot reach the model.

    A byte-level BPE token stands for at most `_longest_token` bytes, so turns holding `budget` =
    max_length * that many characters already encode to at least max_length tokens; and turns are joined
    at whitespace, where the pre-tokenizer splits, so the newest tokens are the same with or without the
    older turns. Encoding long conversations then costs the same as short ones."""
    total = 0
    for i in range(len(example.context) - 1, 0, -1):
        total += len(example.context[i])
        if total >= budget:
            return Example(example.context[i:], example.reply, example.persona)
    return example


def encode_examples(tokenizer, examples, max_length: int | None = None, width: int | None = None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and labels (int64, right-padded; label padding is IGNORE_INDEX).

    `max_length` caps both sides (contexts keep their newest tokens, replies their first). Contexts are padded
    to the longest context and labels to the longest reply (replies are short: the decoder runs on no more
    positions than they need); `width` pads both sides to that many columns instead (a fixed shape, so a
    jitted step compiles once).
    """
    limit = max_length or tokenizer.model_max_length
    examples = [_newest_turns(example, limit * _longest_token(tokenizer)) for example in examples]
    # one batched call each for contexts and replies (the tokenizers library encodes a batch in parallel);
    # contexts are cut from the left as `build_conversation_ids` cuts them, replies from the right
    contexts = [conversation_text(example.messages(), eos_token="") for example in examples]
    inputs = [ids[max(0, len(ids) - limit):] for ids in
              tokenizer(contexts, add_prefix_space=False, add_special_tokens=True)["input_ids"]]
    labels = [ids if len(ids) <= limit else ids[: limit - 1] + [tokenizer.eos_token_id] for ids in
              tokenizer([" " + example.reply if example.reply else "" for example in examples],  # "": </s> alone
                        add_prefix_space=False)["input_ids"]]
    if width is not None and max(len(r) for r in inputs + labels) > width:
        raise ValueError(f"a context or reply is longer than width={width}; raise width or lower max_length")

    def pad(rows, value):  # [len(rows), width or the longest row]
        out = np.full((len(rows), width or max(map(len, rows))), value, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    input_ids = pad(inputs, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": (pad(inputs, -1) != -1).astype(np.int64),
            "labels": pad(labels, IGNORE_INDEX)}


def pad_batch(batch: dict[str, np.ndarray], rows: int, source_length: int, target_length: int,
              pad_token_id: int) -> dict[str, np.ndarray]:
    """`batch` (input_ids, attention_mask, labels) padded to a fixed shape: [rows, source_length] and
    [rows, target_length]. Columns are padded on the right (pad ids, mask 0, ignored labels); added rows
    hold one pad token seen by the mask and only ignored labels. The loss sum, the count of tokens that
    count and so the update are those of `batch`: a step on one shape (a CUDA graph) takes every batch."""
    have, source, target = batch["input_ids"].shape[0], batch["input_ids"].shape[1], batch["labels"].shape[1]
    if have > rows or source > source_length or target > target_length:
        raise ValueError(f"a batch of {have} rows x {source} + {target} tokens does not fit the fixed shape "
                         f"{rows} x {source_length} + {target_length}")
    out = {"input_ids": np.full((rows, source_length), pad_token_id, dtype=np.int64),
           "attention_mask": np.zeros((rows, source_length), dtype=np.int64),
           "labels": np.full((rows, target_length), IGNORE_INDEX, dtype=np.int64)}
    out["attention_mask"][have:, 0] = 1  # added rows attend to their one pad token (no row is fully masked)
    for name, value in batch.items():
        out[name][:have, :value.shape[1]] = value
    return out


def as_example(context, reply: str) -> Example:
    return Example((context,) if isinstance(context, str) else tuple(context), reply)


def encode_pairs(tokenizer, pairs, max_length: int | None = None, width: int | None = None) -> dict[str, np.ndarray]:
    """`encode_examples` for (context, reply) pairs; a context is a string (one user turn) or turns."""
    return encode_examples(tokenizer, [as_example(c, r) for c, r in pairs], max_length, width)


# ---------------------------------------------------------------------- the packaged corpus
def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(context, reply) pairs of `context<TAB>reply` lines; lines without both parts are skipped."""
    pairs = []
    for line in text.splitlines():
        context, tab, reply = line.partition("\t")
        if tab and context.strip() and reply.strip():
            pairs.append((context.strip(), reply.strip()))
    return pairs


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(context, reply) pairs of a tab-separated dialogue file."""
    with open(path, encoding="utf-8-sig") as f:
        return parse_pairs(f.read())


def corpus_pairs() -> list[tuple[str, str]]:
    """The package's small dialogue corpus (data/dialogues.txt), used by the tests and the examples."""
    return parse_pairs(resources.files("blenderbot_mb").joinpath("data/dialogues.txt").read_text(encoding="utf-8"))
