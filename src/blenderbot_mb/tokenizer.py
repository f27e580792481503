"""The Blenderbot tokenizer: byte-level BPE (GPT-2/RoBERTa family) on the `tokenizers` library.

Framework-free: torch / tensorflow / jax are imported only when `return_tensors` asks for them.

    >>> tok = BlenderbotTokenizer.from_pretrained("facebook/blenderbot-400M-distill")
    >>> tok("Hello world").input_ids            # slow default: add_prefix_space=False
    [47, 921, 86, 1085, 2]
    >>> tok(" Hello world").input_ids
    [6950, 1085, 2]
    >>> BlenderbotTokenizerFast.from_pretrained("facebook/blenderbot-400M-distill")("Hello world").input_ids
    [6950, 1085, 2]

One implementation, two names: `BlenderbotTokenizer` defaults to add_prefix_space=False (the reference's
pure-Python tokenizer), `BlenderbotTokenizerFast` to True (the published fast tokenizer). A value saved in
tokenizer_config.json wins over the class default; an explicit argument wins over both; assigning
`tokenizer.add_prefix_space` later takes effect at once.

Ids: <pad> 0, <s> 1, </s> 2, <unk> 3, and <mask> last. The published vocabulary holds 8009 tokens
(8008 + <mask>) while the models have 8008 embeddings: <mask> is outside the model's range (the
backends reject it). `vocab_size` is the BPE vocabulary without <mask>; `len(tokenizer)` counts it.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Mapping
from functools import cached_property, partial
from typing import NamedTuple

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .conversation import CHAT_TEMPLATE
from .errors import BlenderbotError, CheckpointError, ConfigError, InputError
from .fileio import atomic_path, atomic_write_text
from .hub import pop_hub_kwargs, resolve_folder
from .validation import check_text, short

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CORE_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 in every Blenderbot vocabulary
PADDING = {False: None, None: None, "do_not_pad": None, True: "longest", "longest": "longest",
           "max_length": "max_length"}
TRUNCATION = {False: None, "do_not_truncate": None, True: "longest_first", "longest_first": "longest_first",
              "only_first": "only_first", "only_second": "only_second"}
CONFIG_KEYS = ("errors", "add_prefix_space", "model_max_length", "clean_up_tokenization_spaces",
               "padding_side", "truncation_side", *SPECIAL_TOKEN_NAMES)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE; 'Ġ' is the space byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    """A byte-level token's bytes; a token outside the byte alphabet (an added token) is its UTF-8 text."""
    if all(c in BYTE_DECODER for c in token):
        return bytes(BYTE_DECODER[c] for c in token)
    return token.encode("utf-8")


def _token_text(token, name: str = "special token") -> str | None:
    """Special tokens may be saved as AddedToken dicts ({"content": ...}); keep their text."""
    text = token.get("content", 0) if isinstance(token, dict) else str(token) if isinstance(token, AddedToken) \
        else token
    if text is not None and (not isinstance(text, str) or not text):
        raise ConfigError(f"tokenizer setting {name!r} must be a token (a non-empty str), got {short(token)}")
    return text


def _check_settings(errors, model_max_length, add_prefix_space, clean_up_tokenization_spaces, padding_side,
                    truncation_side) -> None:
    """The settings of tokenizer_config.json (or the constructor), with JSON's types kept apart."""
    try:
        known = isinstance(errors, str) and codecs.lookup_error(errors)
    except LookupError:
        known = False
    checks = {
        "errors": (known, "a Python decoding error handler such as 'replace' or 'strict'"),
        "model_max_length": (model_max_length is None or (isinstance(model_max_length, int) and not isinstance(
            model_max_length, bool) and model_max_length > 0), "a positive integer"),
        "add_prefix_space": (add_prefix_space is None or isinstance(add_prefix_space, bool), "a boolean"),
        "clean_up_tokenization_spaces": (isinstance(clean_up_tokenization_spaces, bool), "a boolean"),
        "padding_side": (padding_side in ("left", "right"), "'left' or 'right'"),
        "truncation_side": (truncation_side in ("left", "right"), "'left' or 'right'"),
    }
    values = dict(errors=errors, model_max_length=model_max_length, add_prefix_space=add_prefix_space,
                  clean_up_tokenization_spaces=clean_up_tokenization_spaces, padding_side=padding_side,
                  truncation_side=truncation_side)
    for name, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"tokenizer setting {name!r} must be {expected}, got {short(values[name])}")


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid JSON: {short(str(e), 200)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class TokenSpan(NamedTuple):
    start: int
    end: int


class CharSpan(NamedTuple):
    start: int
    end: int


class Alignment:
    """Where each token of one encoded row came from, worked out when first asked (encoding costs nothing
    more): the word (of its sequence) and the sequence (0: the text, 1: the pair) of each token, None for `</s>`
    and padding, and its (start, end) characters in its text ((0, 0) for those). `parts`: per sequence, the
    `tokenizers` Encoding and the range of its tokens kept after truncation."""

    def __init__(self, tokenizer, ids: list, parts: list, specials: int, pad_left: int, pad_right: int):
        self.tokenizer, self.ids, self.parts = tokenizer, ids, parts
        self.before, self.after = pad_left, specials + pad_right

    def _per_token(self, get, filler) -> list:
        out = [filler] * self.before
        for sequence, (encoding, start, stop) in enumerate(self.parts):
            out += get(sequence, encoding)[start:stop]
        return out + [filler] * self.after

    @cached_property
    def word_ids(self) -> list:
        return self._per_token(lambda _, e: e.word_ids, None)

    @cached_property
    def sequence_ids(self) -> list:
        return self._per_token(lambda q, e: [q] * len(e.ids), None)

    @cached_property
    def offsets(self) -> list:
        return self._per_token(lambda _, e: [tuple(o) for o in e.offsets], (0, 0))


class BatchEncoding(dict):
    """A dict of model inputs with attribute access: `enc.input_ids`, `enc["attention_mask"]`. Made by calling
    the tokenizer, it also answers transformers' fast-tokenizer questions about each row: `tokens()`,
    `word_ids()`, `sequence_ids()`, `token_to_word()`, `word_to_tokens()`, `token_to_chars()`,
    `char_to_token()`, `char_to_word()`, `word_to_chars()`, `token_to_sequence()` (the batch index first
    when there are two indices, as there)."""

    def __init__(self, data=None, alignments: list[Alignment] | None = None):
        super().__init__(data or {})
        self.__dict__["_alignments"] = alignments

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        """Move PyTorch tensors to `device` (other values are left as they are)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()},
                             self._alignments)

    # ------------------------------------------------------------------ alignment (fast-tokenizer API)
    @property
    def is_fast(self) -> bool:
        return self._alignments is not None

    @property
    def n_sequences(self) -> int | None:
        if self._alignments is None:
            return None
        return max((max((i for i in a.sequence_ids if i is not None), default=0) + 1 for a in self._alignments),
                   default=1)

    def _row(self, batch_index: int) -> Alignment:
        if self._alignments is None:
            raise InputError("this encoding holds no alignment (made by pad() or by hand, not by calling the "
                             "tokenizer on text)")
        if not isinstance(batch_index, (int, np.integer)) or not -len(self._alignments) <= batch_index < len(
                self._alignments):
            raise InputError(f"batch index {batch_index!r} is out of range for {len(self._alignments)} row(s)")
        return self._alignments[batch_index]

    def _two(self, first, second):
        """transformers' (batch_or_index, index=None): one number is an index into row 0."""
        return (0, first) if second is None else (first, second)

    @staticmethod
    def _token(row: Alignment, token_index: int) -> int:
        n = len(row.ids)
        if not isinstance(token_index, (int, np.integer)) or not -n <= token_index < n:
            raise InputError(f"token index {token_index!r} is out of range for a row of {n} tokens")
        return int(token_index) % n

    def tokens(self, batch_index: int = 0) -> list[str]:
        row = self._row(batch_index)
        return row.tokenizer.convert_ids_to_tokens(list(row.ids))

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return list(self._row(batch_index).word_ids)

    def words(self, batch_index: int = 0) -> list[int | None]:
        return self.word_ids(batch_index)

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        return list(self._row(batch_index).sequence_ids)

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        batch, token = self._two(batch_or_token_index, token_index)
        row = self._row(batch)
        return row.sequence_ids[self._token(row, token)]

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        batch, token = self._two(batch_or_token_index, token_index)
        row = self._row(batch)
        return row.word_ids[self._token(row, token)]

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        batch, token = self._two(batch_or_token_index, token_index)
        row = self._row(batch)
        token = self._token(row, token)
        return None if row.sequence_ids[token] is None else CharSpan(*row.offsets[token])

    def word_to_tokens(self, batch_or_word_index: int, word_index: int | None = None,
                       sequence_index: int = 0) -> TokenSpan | None:
        batch, word = self._two(batch_or_word_index, word_index)
        row = self._row(batch)
        found = [i for i, (w, q) in enumerate(zip(row.word_ids, row.sequence_ids, strict=True))
                 if w == word and q == sequence_index]
        return TokenSpan(found[0], found[-1] + 1) if found else None

    def word_to_chars(self, batch_or_word_index: int, word_index: int | None = None,
                      sequence_index: int = 0) -> CharSpan | None:
        batch, word = self._two(batch_or_word_index, word_index)
        span = self.word_to_tokens(batch, word, sequence_index)
        if span is None:
            return None
        offsets = self._row(batch).offsets
        return CharSpan(offsets[span.start][0], offsets[span.end - 1][1])

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None,
                      sequence_index: int = 0) -> int | None:
        batch, char = self._two(batch_or_char_index, char_index)
        row = self._row(batch)
        for i, ((start, end), q) in enumerate(zip(row.offsets, row.sequence_ids, strict=True)):
            if q == sequence_index and start <= char < end:
                return i
        return None

    def char_to_word(self, batch_or_char_index: int, char_index: int | None = None,
                     sequence_index: int = 0) -> int | None:
        batch, char = self._two(batch_or_char_index, char_index)
        token = self.char_to_token(batch, char, sequence_index)
        return None if token is None else self._row(batch).word_ids[token]


def as_tensor(rows, return_tensors: str | None, what: str = "input_ids"):
    """list[list[int]] -> the requested array type (np int64, torch int64, tf/jax int32 like the reference)."""
    if return_tensors is None:
        return rows
    if len({len(r) for r in rows}) > 1:
        raise InputError(f"{what} rows have different lengths {sorted({len(r) for r in rows})}; pass "
                         f"padding=True (with padding='max_length', truncation=True too) to "
                         f"return_tensors={return_tensors!r}")
    import numpy as np

    array = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1, *((2,) if what == "offset_mapping" else ()))
    if return_tensors == "np":
        return array
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(array)
    if return_tensors == "tf":
        import tensorflow as tf

        return tf.constant(array.astype(np.int32))
    if return_tensors == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array.astype(np.int32))
    raise InputError(f"return_tensors must be None, 'np', 'pt', 'tf' or 'jax', not {return_tensors!r}")


def _to_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy, torch, tf (via numpy), jax
        ids = ids.tolist()
    elif hasattr(ids, "numpy"):
        ids = ids.numpy().tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


# keyword arguments of the reference's __call__ that ask for nothing here at these values (others are named)
_NOTHING_ASKED = {"return_overflowing_tokens": (False,),
                  "verbose": (True, False), "stride": (0,)}


def _check_unused(kwargs: dict) -> None:
    """Keyword arguments this tokenizer does not read: the reference's at values that ask for nothing pass;
    anything else (a misspelling, an unsupported output) is an error naming it, not silently ignored."""
    left = sorted(k for k, v in kwargs.items() if not (k in _NOTHING_ASKED and v in _NOTHING_ASKED[k]))
    if left:
        raise InputError(f"the tokenizer does not take {', '.join(f'{k}={kwargs[k]!r}' for k in left)}")


class BlenderbotTokenizer:
    """Byte-level BPE tokenizer of Blenderbot. Encoder inputs are `text </s>` (no `<s>`)."""

    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt", "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    default_add_prefix_space = False

    def __init__(self, vocab_file=None, merges_file=None, tokenizer_file=None, errors="replace", bos_token="<s>",
                 eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                 mask_token="<mask>", add_prefix_space=None, model_max_length=128,
                 clean_up_tokenization_spaces=False, padding_side="right", truncation_side="right",
                 tokenizer_object: Tokenizer | None = None, name_or_path: str = "", **unused):
        _check_settings(errors, model_max_length, add_prefix_space, clean_up_tokenization_spaces, padding_side,
                        truncation_side)
        self._special = dict(bos_token=bos_token, eos_token=eos_token, sep_token=sep_token, cls_token=cls_token,
                             unk_token=unk_token, pad_token=pad_token, mask_token=mask_token)
        self._special = {k: _token_text(v, k) for k, v in self._special.items()}
        if self._special["eos_token"] is None:
            raise ConfigError("tokenizer setting 'eos_token' is required: Blenderbot's inputs end with it")
        try:
            backend = self._build_backend(vocab_file, merges_file, tokenizer_file, tokenizer_object)
        except BlenderbotError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exception on malformed files
            files = [os.fspath(f) for f in (tokenizer_file, vocab_file, merges_file) if f is not None]
            raise CheckpointError(f"cannot read the tokenizer ({', '.join(files) or 'tokenizer_object'}): "
                                  f"{short(str(e), 200)}") from None
        self.errors = errors
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.name_or_path = name_or_path
        self._json = backend.to_str()
        self._backends: dict[tuple[bool, bool], Tokenizer] = {}
        self.add_prefix_space = self.default_add_prefix_space if add_prefix_space is None else add_prefix_space
        self._special_ids = {backend.token_to_id(t) for t in self._special.values() if t is not None}
        self._special_ids |= {t["id"] for t in json.loads(self._json).get("added_tokens", ()) if t.get("special")}

    def _build_backend(self, vocab_file, merges_file, tokenizer_file, tokenizer_object) -> Tokenizer:
        if tokenizer_object is not None:
            backend = Tokenizer.from_str(tokenizer_object.to_str())
        elif tokenizer_file is not None:
            backend = Tokenizer.from_file(os.fspath(tokenizer_file))
        elif vocab_file is not None and merges_file is not None:
            bpe = models.BPE.from_file(os.fspath(vocab_file), os.fspath(merges_file), continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False)
            backend = Tokenizer(bpe)
        else:
            raise CheckpointError("BlenderbotTokenizer needs tokenizer_file, or vocab_file and merges_file")
        backend.add_special_tokens([
            AddedToken(t, special=True, normalized=False, lstrip=(name == "mask_token"))
            for name, t in self._special.items() if t is not None  # ids kept when already in the vocab
        ])
        backend.decoder = decoders.ByteLevel()
        eos = self._special["eos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 $B:1 {eos}:1", special_tokens=[(eos, backend.token_to_id(eos))])
        backend.no_truncation()
        backend.no_padding()
        return backend

    # ------------------------------------------------------------------ backend
    def _backend(self, add_prefix_space: bool | None = None, split_special_tokens: bool = False) -> Tokenizer:
        """The `tokenizers` pipeline with a ByteLevel pre-tokenizer adding (or not) the prefix space;
        `split_special_tokens` encodes special tokens typed in the text ("</s>") as plain text."""
        key = (self.add_prefix_space if add_prefix_space is None else bool(add_prefix_space), split_special_tokens)
        if key not in self._backends:
            backend = Tokenizer.from_str(self._json)
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=key[0], use_regex=True)
            backend.encode_special_tokens = split_special_tokens
            self._backends[key] = backend
        return self._backends[key]

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._backend()

    # ------------------------------------------------------------------ vocabulary and special tokens
    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary, without added tokens such as <mask>."""
        return self._backend().get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend().get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend().get_vocab(with_added_tokens=True)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Add whole tokens to the vocabulary (new ids after the last one), as the reference does; returns how
        many were new. Then give the model as many rows: `model.resize_token_embeddings(len(tokenizer))`."""
        items = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        for item in items:
            if not isinstance(item, (str, AddedToken)) or not str(item):
                raise InputError(f"add_tokens takes non-empty strings (or tokenizers.AddedToken), got {item!r}")
        tokens = [item if isinstance(item, AddedToken) else
                  AddedToken(item, special=special_tokens, normalized=not special_tokens) for item in items]
        backend = Tokenizer.from_str(self._json)
        added = backend.add_special_tokens(tokens) if special_tokens else backend.add_tokens(tokens)
        self._json, self._backends = backend.to_str(), {}
        if special_tokens:  # skipped by decode(skip_special_tokens=True), as the reference's special tokens
            self._special_ids |= {backend.token_to_id(str(t)) for t in tokens}
        return added

    def __getattr__(self, name):  # bos_token, bos_token_id, ... for every special token name
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            token_id = self._backend().token_to_id(tokens)
            return self._backend().token_to_id(self._special["unk_token"]) if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in _to_id_list(ids)
                if not (skip_special_tokens and i in self._special_ids)]

    def _id_to_token(self, i: int) -> str:
        token = self._backend().id_to_token(i) if i >= 0 else None
        if token is None:
            raise InputError(f"token id {i} is outside the tokenizer's vocabulary [0, {len(self)})")
        return token

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """`X </s>`; token_ids_1 is ignored, as in the reference."""
        return list(token_ids_0) + [self.eos_token_id]

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str, add_prefix_space: bool | None = None, **unused) -> list[str]:
        return self._backend(add_prefix_space).encode(text, add_special_tokens=False).tokens

    def _encode_texts(self, texts, is_split_into_words: bool, add_prefix_space: bool | None,
                      split_special_tokens: bool = False, encodings: bool = False) -> list:
        """Each text's ids; with `encodings`, each text's `tokenizers` Encoding (its tokens' characters in the
        text, of the word for pre-split words, and their words)."""
        for t in texts:
            ok = isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t) if is_split_into_words \
                else isinstance(t, str)
            if not ok:
                want = "a list of words (str)" if is_split_into_words else "a str"
                raise InputError(f"each text must be {want}, got {type(t).__name__}: {short(t, 80)}")
            for text in (t if is_split_into_words else [t]):
                check_text(text)
        # Pre-split words are each tokenized with a leading space, as the reference documents.
        backend = self._backend(True if is_split_into_words else add_prefix_space, split_special_tokens)
        found = backend.encode_batch(list(texts), is_pretokenized=is_split_into_words, add_special_tokens=False)
        return found if encodings else [e.ids for e in found]

    def _truncate(self, ids0, ids1, budget: int, strategy: str):
        """Fit ids0 (+ ids1) into `budget` tokens, like the `tokenizers` library does."""
        cut = (lambda ids, n: ids[len(ids) - n:]) if self.truncation_side == "left" else (lambda ids, n: ids[:n])
        n0, n1 = len(ids0), len(ids1 or [])
        if n0 + n1 <= budget:
            return ids0, ids1
        if ids1 is None or strategy == "only_first":
            if n1 > budget:
                raise InputError(f"cannot truncate only the first sequence: the second alone has {n1} > {budget}")
            return cut(ids0, budget - n1), ids1
        if strategy == "only_second":
            if n0 > budget:
                raise InputError(f"cannot truncate only the second sequence: the first alone has {n0} > {budget}")
            return ids0, cut(ids1, budget - n0)
        # longest_first, as the `tokenizers` library does it: the shorter one keeps its length if it can.
        short, long_ = sorted((n0, n1))
        long_ = short if short > budget else max(short, budget - short)
        if short + long_ > budget:
            short, long_ = budget // 2, budget // 2 + budget % 2
        k0, k1 = (long_, short) if n0 > n1 else (short, long_)
        return cut(ids0, k0), cut(ids1, k1)

    def __call__(self, text=None, text_pair=None, add_special_tokens: bool = True, padding=False, truncation=None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None, return_tensors=None,
                 return_attention_mask: bool = True, is_split_into_words: bool = False,
                 add_prefix_space: bool | None = None, split_special_tokens: bool = False, text_target=None,
                 text_pair_target=None, return_token_type_ids: bool | None = None,
                 return_special_tokens_mask: bool = False, return_length: bool = False,
                 padding_side: str | None = None, return_offsets_mapping: bool = False, **unused) -> BatchEncoding:
        """`split_special_tokens=True` (as in transformers) encodes special tokens written in the text as text.
        `text_target` (a reply, or replies) adds its ids as `labels`; alone, its encoding is returned. As the
        reference: `return_token_type_ids` (zeros: Blenderbot has one segment), `return_special_tokens_mask` (1
        for the `</s>` added and for padding), `return_length` (each row's length, padding included),
        `padding_side` for this call, and the fast tokenizer's `return_offsets_mapping` (each token's (start, end)
        characters in its text; (0, 0) for `</s>` and padding)."""
        _check_unused(unused)
        if padding_side not in (None, "left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        settings = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                        max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors,
                        is_split_into_words=is_split_into_words, add_prefix_space=add_prefix_space,
                        split_special_tokens=split_special_tokens, return_token_type_ids=return_token_type_ids,
                        return_special_tokens_mask=return_special_tokens_mask, return_length=return_length,
                        padding_side=padding_side, return_offsets_mapping=return_offsets_mapping)
        if text_target is not None:
            target = self(text_target, text_pair_target, return_attention_mask=return_attention_mask, **settings)
            if text is None:
                return target
            out = self(text, text_pair, return_attention_mask=return_attention_mask, **settings)
            out["labels"] = target["input_ids"]
            return out
        if text is None:
            raise InputError("text is None; pass a str or a list of str")
        batched = (isinstance(text, (list, tuple)) and (not is_split_into_words or
                                                        (len(text) > 0 and isinstance(text[0], (list, tuple)))))
        texts = list(text) if batched else [text]
        pairs = None
        if text_pair is not None:
            pairs = list(text_pair) if batched else [text_pair]
            if len(pairs) != len(texts):
                raise InputError(f"got {len(texts)} texts but {len(pairs)} text_pair entries")
        if padding not in PADDING or truncation not in (*TRUNCATION, None):
            raise InputError(f"padding={padding!r} / truncation={truncation!r} not understood; "
                             f"padding: {list(PADDING)}; truncation: {list(TRUNCATION)}")
        padding = PADDING[padding]
        if truncation is None:  # as in the reference: max_length alone turns truncation on
            truncation = max_length is not None and padding != "max_length"
        truncation = TRUNCATION[truncation]
        limit = max_length if max_length is not None else self.model_max_length

        encode = partial(self._encode_texts, is_split_into_words=is_split_into_words, add_prefix_space=add_prefix_space,
                         split_special_tokens=split_special_tokens, encodings=True)
        encodings0 = encode(texts)
        encodings1 = encode(pairs) if pairs else [None] * len(encodings0)
        n_special = 1 if add_special_tokens else 0
        rows, parts = [], []
        for e0, e1 in zip(encodings0, encodings1, strict=True):
            a, b = e0.ids, None if e1 is None else e1.ids
            if truncation and limit is not None:
                a, b = self._truncate(a, b, max(limit - n_special, 0), truncation)
            left = self.truncation_side == "left"  # (the tokens kept of each sequence, for the alignment)
            parts.append([(e, len(e.ids) - len(kept) if left else 0, len(e.ids) if left else len(kept))
                          for e, kept in ((e0, a), (e1, b)) if e is not None])
            row = a + (b or [])
            rows.append(self.build_inputs_with_special_tokens(row) if add_special_tokens else row)

        masks = [[1] * len(r) for r in rows]
        specials = [[0] * (len(r) - n_special) + [1] * n_special for r in rows]
        lengths = [len(r) for r in rows]
        width = max(lengths, default=0)
        if padding:
            width = limit if padding == "max_length" and limit is not None else width
            if pad_to_multiple_of:
                width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
            rows = [self._pad(r, width, self.pad_token_id, padding_side) for r in rows]
            masks = [self._pad(m, width, 0, padding_side) for m in masks]
            specials = [self._pad(m, width, 1, padding_side) for m in specials]
        left = (padding_side or self.padding_side) == "left"
        alignments = [Alignment(self, row, kept, n_special, max(len(row) - n, 0) if left else 0,
                                0 if left else max(len(row) - n, 0))
                      for row, kept, n in zip(rows, parts, lengths, strict=True)]

        out = {"input_ids": rows}
        if return_token_type_ids:
            out["token_type_ids"] = [[0] * len(r) for r in rows]
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_special_tokens_mask:
            out["special_tokens_mask"] = specials
        if return_offsets_mapping:
            out["offset_mapping"] = [a.offsets for a in alignments]
        if return_length:
            out["length"] = [len(r) for r in rows]
        if return_tensors is not None:
            out = {k: as_tensor(v, return_tensors, k) for k, v in out.items()}
        elif not batched:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out, alignments)

    def _pad(self, row: list[int], width: int, value: int, side: str | None = None) -> list[int]:
        fill = [value] * max(width - len(row), 0)
        return fill + row if (side or self.padding_side) == "left" else row + fill

    def encode_plus(self, text, text_pair=None, **kwargs) -> BatchEncoding:
        """The reference's older name for calling the tokenizer on one text (or pair)."""
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs) -> BatchEncoding:
        """The reference's older name for calling the tokenizer on a batch: texts, or (text, pair) tuples."""
        batch = list(batch_text_or_text_pairs)
        if batch and all(isinstance(t, tuple) and len(t) == 2 for t in batch) and not kwargs.get(
                "is_split_into_words"):
            return self([t[0] for t in batch], [t[1] for t in batch], **kwargs)
        return self(batch, **kwargs)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """Tokens the tokenizer adds to a text (or a pair): the closing `</s>`."""
        return 1

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        """1 where `build_inputs_with_special_tokens` puts a special token (or, for ids that already have them,
        where a special token is), else 0."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise InputError("token_ids_1 is for ids without special tokens (already_has_special_tokens=False)")
            return [1 if i in self._special_ids else 0 for i in _to_id_list(token_ids_0)]
        return [0] * (len(_to_id_list(token_ids_0)) + len(_to_id_list(token_ids_1 or []))) + [1]

    is_fast = True  # (run by the `tokenizers` library; the BatchEncoding it returns answers word_ids() and the rest)

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, return_tensors=None, **kwargs):
        """Ids of one text (a list, or a (1, n) tensor when return_tensors is set)."""
        if not isinstance(text, str) and not kwargs.get("is_split_into_words"):
            raise InputError(f"encode takes one str, got {type(text).__name__}; use tokenizer([...]) for batches")
        enc = self(text, text_pair, add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs)
        return enc["input_ids"]

    def pad(self, encoded_inputs, padding=True, max_length: int | None = None, pad_to_multiple_of=None,
            return_tensors=None, return_attention_mask: bool = True, padding_side: str | None = None,
            verbose: bool = True) -> BatchEncoding:
        """Pad a list of encodings ({"input_ids": [...], ...}), a dict of lists, or one encoding, to one length,
        as the reference: input_ids with the pad id, attention_mask with 0, token_type_ids with 0 and
        special_tokens_mask with 1; other keys (labels, ...) are kept as they are."""
        if isinstance(encoded_inputs, (list, tuple)):
            if not encoded_inputs or not all(isinstance(e, Mapping) for e in encoded_inputs):
                raise InputError("pad takes a list of encodings (dicts with input_ids), a dict of lists, or one "
                                 "encoding")
            encoded_inputs = {k: [e[k] for e in encoded_inputs] for k in encoded_inputs[0]}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            raise InputError("pad needs the encodings' input_ids")
        if padding_side not in (None, "left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        ids = encoded_inputs["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        single = not ids or not isinstance(ids[0], (list, tuple))  # one encoding: its values are not rows
        data = {k: [v] if single else v for k, v in encoded_inputs.items()}
        rows = [_to_id_list(r) for r in data["input_ids"]]
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
        out = {k: ([_to_id_list(r) for r in v] if k in fills else v) for k, v in data.items()}
        if return_attention_mask and "attention_mask" not in out:
            out["attention_mask"] = [[1] * len(r) for r in rows]
        if not return_attention_mask:
            out.pop("attention_mask", None)
        padding = PADDING[padding]
        if padding:
            width = max_length if padding == "max_length" and max_length else max(map(len, rows), default=0)
            if pad_to_multiple_of:
                width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
            for key, fill in fills.items():
                if key in out:
                    out[key] = [self._pad(r, width, fill, padding_side) for r in out[key]]
        if single and return_tensors is None:
            return BatchEncoding({k: v[0] for k, v in out.items()})
        for key, rows_of in out.items():
            if return_tensors and key not in fills and len({len(_to_id_list(r)) for r in rows_of}) > 1:
                raise InputError(f"{key} rows have different lengths: pad() pads input_ids and the masks only, so "
                                 f"pad {key} first (labels with -100, as DataCollatorForSeq2Seq does)")
        return BatchEncoding({k: as_tensor(v, return_tensors, k) if k in fills or return_tensors else v
                              for k, v in out.items()})

    # ------------------------------------------------------------------ decoding
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Byte-level tokens -> text; tokens outside the byte alphabet (added tokens) are taken literally."""
        return b"".join(_token_bytes(t) for t in tokens).decode("utf-8", errors=self.errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold only part of a UTF-8 character)."""
        return _token_bytes(self._id_to_token(int(token_id)))

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **unused) -> str:
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(_to_id_list(token_ids), skip_special_tokens))
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **unused) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ------------------------------------------------------------------ conversations
    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, padding=False, truncation=None, max_length: int | None = None,
                            return_tensors=None, return_dict: bool = False, return_assistant_tokens_mask: bool = False,
                            tokenizer_kwargs: dict | None = None, **template_kwargs):
        """Chat messages -> the Blenderbot conversation format (see blenderbot_mb.conversation).

        Works without a template file: `tokenize=False` gives the string (ending in `</s>`), otherwise the ids,
        cut from the left to `max_length` (default model_max_length) so the newest turns survive (whatever
        `truncation` says: the format's own rule). A list of conversations gives one row each; `padding`
        (True / "longest" / "max_length", with `tokenizer_kwargs` pad_to_multiple_of, padding_side) pads
        them as `pad()` does, so that `return_tensors` can stack them. `add_generation_prompt` changes
        nothing: the decoder starts from <s> on its own. What the format has no place for (tools, documents,
        another template, a continued final message, assistant masks, template variables) is refused.
        """
        from .conversation import build_conversation_ids, conversation_text

        refused = [name for name, value, default in (
            ("tools", tools, None), ("documents", documents, None), ("chat_template", chat_template, None),
            ("continue_final_message", continue_final_message, False),
            ("return_assistant_tokens_mask", return_assistant_tokens_mask, False)) if value != default]
        if refused or template_kwargs:
            raise InputError(f"apply_chat_template: {', '.join(refused + sorted(template_kwargs))} not taken: "
                             "the Blenderbot format has turns and persona (system) lines only, and no template "
                             "variables")
        pad_options = dict(tokenizer_kwargs or {})
        unknown = sorted(set(pad_options) - {"pad_to_multiple_of", "padding_side"})
        if unknown:
            raise InputError(f"apply_chat_template: tokenizer_kwargs {', '.join(unknown)} not taken (only "
                             "pad_to_multiple_of and padding_side)")
        if not isinstance(padding, (bool, str, type(None))) or padding not in PADDING:
            raise InputError(f"padding must be one of {sorted(map(str, PADDING))}, got {padding!r}")
        if truncation is not None and (not isinstance(truncation, (bool, str)) or truncation not in TRUNCATION):
            raise InputError(f"truncation must be one of {sorted(map(str, TRUNCATION))}, got {truncation!r}")
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and all(
            isinstance(c, (list, tuple)) or hasattr(c, "iter_texts") for c in conversation)
        convs = list(conversation) if batched else [conversation]
        if not tokenize:
            texts = [conversation_text(c, eos_token=self.eos_token) for c in convs]
            return texts if batched else texts[0]
        rows = [build_conversation_ids(self, c, max_length=max_length) for c in convs]
        enc = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        if PADDING[padding]:
            width = max_length if max_length is not None else self.model_max_length
            enc = dict(self.pad(enc, padding=padding, max_length=width, **pad_options))
        elif pad_options:
            raise InputError("apply_chat_template: tokenizer_kwargs pad_to_multiple_of and padding_side need padding")
        if return_tensors is not None:
            enc = {k: as_tensor(v, return_tensors, k) for k, v in enc.items()}
        elif not batched:
            enc = {k: v[0] for k, v in enc.items()}
        return BatchEncoding(enc) if return_dict else enc["input_ids"]

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a folder (or hub id): tokenizer.json if present, else vocab.json + merges.txt.

        Priority for every setting: explicit kwargs > tokenizer_config.json > the class default.
        """
        folder = resolve_folder(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                saved = _read_json_object(path)
                try:
                    settings.update({k: _token_text(v, k) if k in SPECIAL_TOKEN_NAMES else v
                                     for k, v in saved.items() if k in CONFIG_KEYS})
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
        max_length = settings.get("model_max_length")
        if isinstance(max_length, (int, float)) and not isinstance(max_length, bool) and max_length > 1e20:
            settings.pop("model_max_length")  # HF's "no limit" sentinel
        files = {}
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            files["tokenizer_file"] = os.path.join(folder, "tokenizer.json")
        elif all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
            files = {"vocab_file": os.path.join(folder, "vocab.json"),
                     "merges_file": os.path.join(folder, "merges.txt")}
        else:
            raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + merges.txt")
        return cls(**{**files, **settings, "name_or_path": os.fspath(pretrained_model_name_or_path), **kwargs})

    def save_pretrained(self, save_directory, **unused) -> tuple[str, ...]:
        """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json (with the conversation format as
        a `chat_template`) and special_tokens_map.json."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        backend = self._backend()
        state = json.loads(backend.to_str())
        vocab = dict(sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        mask = {"content": self.mask_token, "lstrip": True, "rstrip": False, "normalized": False,
                "single_word": False, "special": True} if self.mask_token else None
        config = {
            "tokenizer_class": type(self).__name__,
            "add_prefix_space": self.add_prefix_space,
            "model_max_length": self.model_max_length,
            "errors": self.errors,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            **self.special_tokens_map,
            "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                     for t in state["added_tokens"]},
            "chat_template": CHAT_TEMPLATE,  # for transformers' apply_chat_template on this folder
        }
        special_map = {**self.special_tokens_map, **({"mask_token": mask} if mask else {})}
        paths = {name: os.path.join(save_directory, name) for name in (
            "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
        atomic_write_text(paths["vocab.json"], json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(paths["merges.txt"], "#version: 0.2\n" + "".join(m + "\n" for m in merges))
        with atomic_path(paths["tokenizer.json"]) as tmp:
            backend.save(tmp)
        atomic_write_text(paths["tokenizer_config.json"], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(paths["special_tokens_map.json"],
                          json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        return tuple(paths.values())

    def __repr__(self):
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"len={len(self)}, add_prefix_space={self.add_prefix_space}, "
                f"model_max_length={self.model_max_length})")


class BlenderbotTokenizerFast(BlenderbotTokenizer):
    """The same tokenizer with the published fast tokenizer's default: add_prefix_space=True."""

    default_add_prefix_space = True


def clean_up_tokenization(text: str) -> str:
    """The reference's optional decode clean-up (spaces before punctuation and English contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------- training and the packaged corpus
def corpus_lines() -> list[str]:
    """Every utterance of the packaged dialogue corpus, in order (`data.corpus_pairs` reads it)."""
    from .data import corpus_pairs

    return [text for pair in corpus_pairs() for text in pair]


def train_tokenizer(texts, vocab_size: int = 1000, min_frequency: int = 2,
                    cls: type[BlenderbotTokenizer] | None = None, **kwargs) -> BlenderbotTokenizer:
    """Train a byte-level BPE with Blenderbot's special tokens at their ids (<pad> 0, <s> 1, </s> 2, <unk> 3).

    `vocab_size` bounds the BPE vocabulary (all 256 bytes included); <mask> is appended after it, as in
    the published vocabulary, so `len(tokenizer) == tokenizer.vocab_size + 1`. Words are learned with
    their leading space, the way Blenderbot sees user turns.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=CORE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts), trainer)
    return (cls or BlenderbotTokenizer)(tokenizer_object=backend, **kwargs)


__all__ = ["BlenderbotTokenizer", "BlenderbotTokenizerFast", "BatchEncoding", "train_tokenizer", "corpus_lines",
           "clean_up_tokenization"]
