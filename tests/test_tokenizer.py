"""The tokenizer against transformers' BlenderbotTokenizer (the oracle) on files we trained and saved.

transformers 5 has one `tokenizers`-backed BlenderbotTokenizer (BlenderbotTokenizerFast is an alias): it
takes add_prefix_space from its argument, else tokenizer_config.json, else True. We always pass it
explicitly, so both sides run with the same setting.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from blenderbot_mb.errors import CheckpointError, InputError
from blenderbot_mb.tokenizer import (
    BlenderbotTokenizer,
    BlenderbotTokenizerFast,
    corpus_lines,
    train_tokenizer,
)

TEXTS = [
    "Hello world", " Hello world", "", " ", "  runs   of  spaces  ", "new\nline\ttab\r\n", "héllo café naïve Ångström",
    "日本語のテキスト、中文字符", "emoji 😀👍🏽 ok", "hi</s>there <s> x <mask> y<mask>z", "<pad><unk>", "I'm don't they've",
    "\n starts with a newline", "1234 56,7.89!?", "My friends are cool but they eat too many carbs.",
    "My friends are cool but they eat too many carbs.</s> <s>That's unfortunate. "
    "Are they trying to lose weight or are they just trying to be healthier?</s> <s> I'm not sure.",
]
CLASSES = [BlenderbotTokenizer, BlenderbotTokenizerFast]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers


def hf_tokenizer(hf, folder, add_prefix_space):
    return hf.BlenderbotTokenizer.from_pretrained(folder, add_prefix_space=add_prefix_space)


def test_import_loads_no_framework():
    code = ("import sys, blenderbot_mb.tokenizer, blenderbot_mb.conversation\n"
            "bad = [m for m in ('torch', 'tensorflow', 'jax', 'flax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("add_prefix_space", [False, True])
def test_ids_and_decode_match_transformers(hf, tokenizer_folder, cls, add_prefix_space):
    ours = cls.from_pretrained(tokenizer_folder, add_prefix_space=add_prefix_space)
    ref = hf_tokenizer(hf, tokenizer_folder, add_prefix_space)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours(text).input_ids == ids, text
        assert ours.encode(text) == ids
        assert ours.tokenize(text) == ref.tokenize(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    batch = ours(TEXTS, padding=True)
    expected = ref(TEXTS, padding=True)
    assert batch.input_ids == expected["input_ids"]
    assert batch.attention_mask == expected["attention_mask"]
    assert ours("a b", "c d").input_ids == ref("a b", "c d")["input_ids"]


def test_vocabulary_and_special_tokens(hf, tokenizer_folder):
    ours = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    ref = hf_tokenizer(hf, tokenizer_folder, False)
    assert ours.get_vocab() == ref.get_vocab()
    assert (ours.vocab_size, len(ours)) == (ref.vocab_size, len(ref)) == (400, 401)
    assert [ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id] == [0, 1, 2, 3]
    assert ours.mask_token_id == len(ours) - 1 == ours.vocab_size  # <mask> sits past the BPE vocabulary
    assert ours.sep_token_id == 2 and ours.cls_token_id == 1
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.convert_tokens_to_ids(["<s>", "</s>", "not-a-token"]) == [1, 2, 3]
    assert ours.convert_ids_to_tokens([0, 1, 2, 3, 400]) == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    assert ours.build_inputs_with_special_tokens([5, 6], [7, 8]) == [5, 6, 2]
    with pytest.raises(InputError):
        ours.decode([5, len(ours)])
    with pytest.raises(InputError):
        ours.convert_ids_to_tokens([-100])


def test_add_prefix_space_defaults_and_priority(tokenizer_folder, tmp_path):
    # A folder whose tokenizer_config.json says nothing about add_prefix_space: the class defaults apply.
    folder = tmp_path / "no_setting"
    shutil.copytree(tokenizer_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["add_prefix_space"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    slow, fast = BlenderbotTokenizer.from_pretrained(folder), BlenderbotTokenizerFast.from_pretrained(folder)
    assert (slow.add_prefix_space, fast.add_prefix_space) == (False, True)
    # The reference's doc examples: the slow one encodes a sentence start differently, the fast one does not.
    spaced = slow(" Hello world").input_ids
    assert slow("Hello world").input_ids != spaced
    assert fast("Hello world").input_ids == fast(" Hello world").input_ids == spaced
    assert spaced[-1] == 2 and slow.tokenize(" Hello world")[0].startswith("Ġ")
    assert not slow.tokenize("Hello world")[0].startswith("Ġ")

    # Saved setting beats the class default; an explicit argument beats both.
    config["add_prefix_space"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert BlenderbotTokenizer.from_pretrained(folder).add_prefix_space is True
    assert BlenderbotTokenizerFast.from_pretrained(folder, add_prefix_space=False).add_prefix_space is False

    # Setting the attribute later takes effect (the reference doc does `tokenizer.add_prefix_space = False`).
    fast.add_prefix_space = False
    assert fast("Hello world").input_ids == slow("Hello world").input_ids
    # A per-call override, as the reference allows.
    assert slow("Hello world", add_prefix_space=True).input_ids == spaced


def test_padding_truncation_and_tensors(hf, tokenizer_folder):
    ours = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    ref = hf_tokenizer(hf, tokenizer_folder, False)
    texts = ["short", "a much longer sentence with several words in it", "mid size text"]
    for kwargs in [dict(padding=True), dict(truncation=True, max_length=5), dict(padding="max_length", max_length=20),
                   dict(padding="longest", truncation="longest_first", max_length=7), dict(max_length=4),
                   dict(padding=True, pad_to_multiple_of=8)]:
        got, want = ours(texts, **kwargs), ref(texts, **kwargs)
        assert got.input_ids == want["input_ids"], kwargs
        assert got.attention_mask == want["attention_mask"], kwargs
    # pairs truncated longest-first
    got = ours(["one two three four five six", "x"], ["seven eight", "y z w v u t s r q"], truncation=True, max_length=6)
    want = ref(["one two three four five six", "x"], ["seven eight", "y z w v u t s r q"], truncation=True,
               max_length=6)
    assert got.input_ids == want["input_ids"]
    # single text: unbatched lists; tensors get a batch axis
    one = ours("mid size text", padding="max_length", max_length=20)
    assert one.input_ids == ref("mid size text", padding="max_length", max_length=20)["input_ids"]
    assert one.attention_mask.count(0) == 20 - len(ours("mid size text").input_ids)
    arr = ours(texts, padding=True, return_tensors="np")
    assert arr.input_ids.dtype == np.int64
    assert arr.input_ids.shape == (3, max(len(r) for r in ours(texts).input_ids))
    np.testing.assert_array_equal(arr.input_ids, np.array(ref(texts, padding=True)["input_ids"]))
    np.testing.assert_array_equal(arr["attention_mask"], np.array(ref(texts, padding=True)["attention_mask"]))
    assert ours("hi", return_tensors="np").input_ids.shape == (1, len(ours("hi").input_ids))
    assert ours(texts, return_attention_mask=False).keys() == {"input_ids"}
    with pytest.raises(InputError):
        ours(texts, return_tensors="np")  # ragged without padding
    with pytest.raises(InputError):
        ours(texts, padding="sideways")
    with pytest.raises(InputError):
        ours([1, 2])
    # left padding / truncation when asked
    ours.padding_side = ours.truncation_side = "left"
    left = ours(texts, padding=True, truncation=True, max_length=6).input_ids
    assert left[0][0] == 0 and left[1][-1] == 2 and len(left[1]) == 6
    assert left[1][:-1] == ours(texts[1], add_special_tokens=False).input_ids[-5:]


def test_return_tensors_pt(tokenizer_folder):
    torch = pytest.importorskip("torch")
    ours = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    expected = ours(["a b c", "d"], padding=True, return_tensors="np")
    got = ours(["a b c", "d"], padding=True, return_tensors="pt")
    assert got.input_ids.dtype == torch.int64
    np.testing.assert_array_equal(got.input_ids.numpy(), expected.input_ids)
    assert got.to("cpu").attention_mask.sum().item() == expected.attention_mask.sum()
    # the decode side accepts tensors, as after model.generate
    assert ours.batch_decode(got.input_ids, skip_special_tokens=True) == ["a b c", "d"]


@pytest.mark.parametrize("kind,module", [("jax", "jax"), ("tf", "tensorflow")])
def test_return_tensors_jax_tf(tokenizer_folder, kind, module):
    pytest.importorskip(module)
    ours = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    got = ours(["a b c", "d"], padding=True, return_tensors=kind)
    expected = ours(["a b c", "d"], padding=True)
    np.testing.assert_array_equal(np.asarray(got.input_ids), expected.input_ids)
    np.testing.assert_array_equal(np.asarray(got.attention_mask), expected.attention_mask)


def test_decode_round_trip_and_cleanup(hf, tokenizer_folder):
    ours = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    for text in TEXTS:  # byte-level BPE is lossless (but <mask> swallows the space before it: lstrip)
        decoded = ours.decode(ours.encode(text, add_special_tokens=False))
        assert decoded == text.replace(" <mask>", "<mask>")
        if "<" not in text:
            assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    ref = hf_tokenizer(hf, tokenizer_folder, False)
    ids = ours.encode("Hi , I 'm here . Are you ? Yes !")
    raw = ours.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert ours.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True) == \
        ref.clean_up_tokenization(raw) == "Hi, I'm here. Are you? Yes!"
    assert ours.batch_decode(np.array([ids, ids])) == [ours.decode(ids)] * 2
    # broken UTF-8 is replaced (errors="replace"), like the reference
    euro = ours.encode("€", add_special_tokens=False)
    assert len(euro) > 1 and ours.decode(euro[:1]) == "\ufffd" == ref.decode(euro[:1])


def test_is_split_into_words(hf, tokenizer_folder):
    ours = BlenderbotTokenizerFast.from_pretrained(tokenizer_folder, add_prefix_space=True)
    ref = hf_tokenizer(hf, tokenizer_folder, True)
    words = ["Hello", "big", "world"]
    assert ours(words, is_split_into_words=True).input_ids == ref(words, is_split_into_words=True)["input_ids"]
    assert ours([words, ["x"]], is_split_into_words=True, padding=True).input_ids == \
        ref([words, ["x"]], is_split_into_words=True, padding=True)["input_ids"]


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(hf, tokenizer_folder, tmp_path, cls, monkeypatch):
    import blenderbot_mb.fileio
    import blenderbot_mb.tokenizer as module

    ours = cls.from_pretrained(tokenizer_folder, add_prefix_space=True, model_max_length=64)
    written = []
    real = blenderbot_mb.fileio.atomic_path

    def recording(path):
        written.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(blenderbot_mb.fileio, "atomic_path", recording)
    monkeypatch.setattr(module, "atomic_path", recording)
    ours.save_pretrained(tmp_path / "saved")
    assert sorted(written) == sorted(os.listdir(tmp_path / "saved")) == sorted(
        ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert (config["add_prefix_space"], config["model_max_length"], config["tokenizer_class"]) == (True, 64, cls.__name__)

    back = BlenderbotTokenizer.from_pretrained(tmp_path / "saved")
    assert back.add_prefix_space is True and back.model_max_length == 64
    ref = getattr(hf, cls.__name__).from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert back(text).input_ids == ours(text).input_ids == ref(text)["input_ids"], text
    # Without tokenizer.json, vocab.json + merges.txt give the same tokenizer.
    os.remove(tmp_path / "saved" / "tokenizer.json")
    slow_files = BlenderbotTokenizer.from_pretrained(tmp_path / "saved")
    assert [slow_files(t).input_ids for t in TEXTS] == [ours(t).input_ids for t in TEXTS]
    with pytest.raises(CheckpointError):
        BlenderbotTokenizer.from_pretrained(tmp_path)  # no tokenizer files


def test_train_tokenizer_and_corpus():
    path = os.path.join(os.path.dirname(__file__), "..", "src", "blenderbot_mb", "data", "dialogues.txt")
    with open(path, encoding="utf-8") as f:
        pairs = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    lines = corpus_lines()
    assert lines == [side for pair in pairs for side in pair] and all("\t" not in t for t in lines)
    tok = train_tokenizer(lines, vocab_size=300)
    assert tok.vocab_size <= 300 and len(tok) == tok.vocab_size + 1
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, len(tok) - 1]) == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    assert tok.decode(tok.encode(lines[0])) == lines[0] + "</s>"


def test_reference_doc_example(tokenizer_folder):
    tok = BlenderbotTokenizer.from_pretrained(tokenizer_folder)
    utterance = "My friends are cool but they eat too many carbs."
    inputs = tok([utterance], return_tensors="np")
    assert inputs.input_ids.shape == (1, len(tok.encode(utterance))) and inputs.input_ids[0, -1] == 2
    assert inputs.attention_mask.min() == 1
    reply = [1, *tok.encode(" That's unfortunate.", add_special_tokens=False), 2]
    assert tok.batch_decode([reply]) == ["<s> That's unfortunate.</s>"]
    assert tok.batch_decode([reply], skip_special_tokens=True) == [" That's unfortunate."]


def test_loads_folders_written_by_transformers(hf, tokenizer_folder, tmp_path):
    ref = hf_tokenizer(hf, tokenizer_folder, True)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # older files: special tokens as AddedToken dicts, model_max_length as the "no limit" sentinel
    config.update(mask_token={"content": "<mask>", "lstrip": True, "__type": "AddedToken"}, model_max_length=1e30)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = BlenderbotTokenizer.from_pretrained(tmp_path)
    assert ours.add_prefix_space is True and ours.mask_token == "<mask>" and ours.model_max_length == 128
    for text in TEXTS:
        assert ours(text).input_ids == ref(text)["input_ids"], text


def test_added_tokens_and_targets_match_transformers(hf, tokenizer_folder, tmp_path):
    """add_tokens (then saved and reloaded) and text_target encode as transformers' tokenizer does."""
    ours, ref = BlenderbotTokenizer.from_pretrained(tokenizer_folder), hf_tokenizer(hf, tokenizer_folder, False)
    for tok in (ours, ref):
        assert tok.add_tokens(["<robot>", "zqxj"]) == 2 and tok.add_tokens("<robot>") == 0
        assert tok.add_tokens(["[TOOL]"], special_tokens=True) == 1
    assert len(ours) == len(ref)
    texts = ["I am a <robot> zqxj!", "[TOOL] call<robot>", "no new tokens here"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == \
            ref.decode(ref(text)["input_ids"], skip_special_tokens=True), text
    ours.save_pretrained(tmp_path)
    again = BlenderbotTokenizer.from_pretrained(tmp_path)
    assert all(again(t)["input_ids"] == ref(t)["input_ids"] for t in texts)
    pair = dict(text=["Hi there!", "How are you?"], text_target=["Hello.", "Fine, thanks."], padding=True)
    got, want = ours(**pair), ref(**pair)
    assert got["labels"] == want["labels"] and got["input_ids"] == want["input_ids"]
    assert ours(text_target="Hello.")["input_ids"] == ref(text_target="Hello.")["input_ids"]
    with pytest.raises(InputError, match="trunction=True"):  # a misspelling is named, not ignored
        ours("Hi", trunction=True)
    with pytest.raises(InputError, match="return_overflowing_tokens"):
        ours("Hi", return_overflowing_tokens=True)
    assert ours("Hi", return_token_type_ids=False, verbose=False)["input_ids"] == ref("Hi")["input_ids"]
    with pytest.raises(InputError, match="non-empty strings"):
        ours.add_tokens([""])


def test_optional_outputs_pad_and_masks_match_transformers(hf, tokenizer_folder):
    """return_special_tokens_mask / return_length / return_token_type_ids / padding_side / return_offsets_mapping
    (the fast tokenizer's: each token's characters) per call, pad() of
    encodings with labels (kept), one encoding or a dict of lists, get_special_tokens_mask: the same keys, order
    and values as transformers; encode_plus / batch_encode_plus (4.37's names) as calling the tokenizer."""
    ours, ref = BlenderbotTokenizer.from_pretrained(tokenizer_folder), hf_tokenizer(hf, tokenizer_folder, False)

    def plain(encoding):
        return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in dict(encoding).items()}

    calls = [
        lambda t: t(TEXTS[:3], return_special_tokens_mask=True, return_length=True, padding=True),
        lambda t: t(TEXTS[:3], return_special_tokens_mask=True, return_token_type_ids=True, padding="max_length",
                    max_length=40, truncation=True, padding_side="left", return_length=True),
        lambda t: t(TEXTS[0], return_token_type_ids=True, return_special_tokens_mask=True),
        lambda t: t(TEXTS, return_offsets_mapping=True, return_length=True, padding=True, max_length=9,
                    truncation=True, padding_side="left", return_special_tokens_mask=True),
        lambda t: t(TEXTS[6], TEXTS[8], return_offsets_mapping=True),
        lambda t: t(TEXTS[:4], return_offsets_mapping=True, padding=True, return_tensors="np"),
        lambda t: t.pad([{"input_ids": [5, 6], "labels": [7, 8], "special_tokens_mask": [0, 1]},
                         {"input_ids": [5], "labels": [7, 9], "special_tokens_mask": [1]}]),
        lambda t: t.pad([{"input_ids": [5, 6], "labels": [7, 8]}, {"input_ids": [5], "labels": [7, 9]}],
                        return_tensors="np"),
        lambda t: t.pad({"input_ids": [5, 6]}),
        lambda t: t.pad({"input_ids": [[5, 6], [7]]}, padding_side="left", pad_to_multiple_of=4),
    ]
    for call in calls:
        got, want = plain(call(ours)), plain(call(ref))
        assert got == want and list(got) == list(want), (got, want)
    ids = ref(TEXTS[0])["input_ids"]
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref.get_special_tokens_mask(
        ids, already_has_special_tokens=True)
    assert ours.get_special_tokens_mask(ids[:-1]) == ours.get_special_tokens_mask(ids, already_has_special_tokens=True)
    assert ours.num_special_tokens_to_add() == ref.num_special_tokens_to_add() == 1
    assert dict(ours.encode_plus("a b", "c d")) == dict(ours("a b", "c d"))
    assert dict(ours.batch_encode_plus([("a b", "c"), ("d", "e f")])) == dict(ours(["a b", "d"], ["c", "e f"]))
    with pytest.raises(InputError, match="pad labels first"):
        ours.pad([{"input_ids": [5, 6], "labels": [7, 8, 9]}, {"input_ids": [5], "labels": [7]}], return_tensors="np")
    with pytest.raises(InputError, match="truncation=True"):
        ours(["a b c d e f g h", "a"], padding="max_length", max_length=4, truncation=False, return_tensors="np")


def test_alignment_answers_as_transformers_fast_tokenizer(hf, tokenizer_folder):
    """tokens(), word_ids(), sequence_ids() and the token/word/character lookups of the BatchEncoding a call
    returns equal transformers' fast tokenizer's, after truncation (either side) and padding (either side), for
    pairs and pre-split words, every index of every row."""
    ours, ref = BlenderbotTokenizer.from_pretrained(tokenizer_folder), hf_tokenizer(hf, tokenizer_folder, False)
    calls = [
        lambda t: t(TEXTS[:4], padding=True),
        lambda t: t(TEXTS[:4], padding="max_length", max_length=12, truncation=True, padding_side="left"),
        lambda t: t(TEXTS[6], TEXTS[8]),
        lambda t: t(TEXTS[:3], TEXTS[3:6], truncation="longest_first", max_length=10, padding=True),
        lambda t: t([["Hello", "wonderful", "world!"], ["Hi", "there"]], is_split_into_words=True, padding=True),
        lambda t: t(TEXTS[:2], padding=True, return_tensors="np"),
    ]
    spaced = hf_tokenizer(hf, tokenizer_folder, True)  # (pre-split words: the reference wants it so)
    for i, call in enumerate(calls):
        got, want = call(ours), call(spaced if i == 4 else ref)
        assert got.is_fast and want.is_fast and got.n_sequences == want.n_sequences, i
        ids = want["input_ids"]
        for row in range(len(ids) if np.ndim(ids) == 2 else 1):
            assert got.tokens(row) == want.tokens(row), (i, row)
            assert got.word_ids(row) == want.word_ids(row), (i, row)
            assert got.sequence_ids(row) == want.sequence_ids(row), (i, row)
            n = len(want.tokens(row))
            for token in range(n):
                for name in ("token_to_word", "token_to_sequence", "token_to_chars"):
                    assert getattr(got, name)(row, token) == getattr(want, name)(row, token), (i, row, token, name)
            # (transformers 5 fails on a negative index: counted from the end, as Python's)
            assert got.token_to_chars(row, -1) == want.token_to_chars(row, n - 1)
            for sequence in range(want.n_sequences):
                for word in range(max((w for w in want.word_ids(row) if w is not None), default=0) + 2):
                    for name in ("word_to_tokens", "word_to_chars"):
                        try:
                            expected = getattr(want, name)(row, word, sequence)
                        except TypeError:  # transformers' word_to_chars of a word the row lacks: None here
                            expected = None
                        assert getattr(got, name)(row, word, sequence) == expected, (i, row, word, sequence, name)
                for char in range(60):
                    for name in ("char_to_token", "char_to_word"):
                        assert getattr(got, name)(row, char, sequence) == getattr(want, name)(row, char, sequence), (
                            i, row, char, sequence, name)
    one = ours(TEXTS[0])
    assert one.word_ids() == ref(TEXTS[0]).word_ids() and one.char_to_token(3) == ref(TEXTS[0]).char_to_token(3)
    assert ours.is_fast
    with pytest.raises(InputError, match="out of range"):
        one.token_to_word(10_000)
    with pytest.raises(InputError, match="no alignment"):
        ours.pad({"input_ids": [5, 6]}).word_ids()
