"""Training data: files (JSON Lines, TSV, whole conversations) checked line by line, and examples encoded in
the model's conversation format."""

import json

import numpy as np
import pytest

from blenderbot_mb.conversation import ChatHistory, build_conversation_ids
from blenderbot_mb.data import Example, TrainingData, corpus_pairs, encode_examples, encode_pairs, read_pairs
from blenderbot_mb.errors import InputError
from blenderbot_mb.tokenizer import BlenderbotTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_folder):
    return BlenderbotTokenizer.from_pretrained(tokenizer_folder)


def ids(tok, text):
    return tok(text, add_prefix_space=False)["input_ids"]


def test_read_pairs_skips_lines_without_both_sides(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("Hi there\tHello!\n\nno tab here\n\tonly reply\ncontext only\t \n  Padded  \t  Reply  \n",
                    encoding="utf-8")
    assert read_pairs(str(path)) == [("Hi there", "Hello!"), ("Padded", "Reply")]
    pairs = corpus_pairs()
    assert len(pairs) == 40 and pairs[0] == ("Hello! How are you today?",
                                             "I'm doing well, thanks for asking. How about you?")


def test_encode_pairs_uses_the_conversation_format(tok):
    pairs = [("Do you have any pets?", "Yes, a dog."), (["I love to cook.", "Me too!", "What do you make?"], "Pasta.")]
    batch = encode_pairs(tok, pairs)
    # user turns get a leading space, assistant turns carry one as generated replies do, turns are joined by
    # two spaces, </s> closes (the tokenizer adds it)
    first = ids(tok, " Do you have any pets?")
    second = ids(tok, " I love to cook.   Me too!   What do you make?")
    # replies get a leading space, as the published models generate them
    labels = [ids(tok, " Yes, a dog."), ids(tok, " Pasta.")]
    width = max(map(len, [first, second]))  # contexts and replies each padded to their own longest
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"].dtype == np.int64
    assert batch["labels"].shape == (2, max(map(len, labels)))
    for row, expected in enumerate([first, second]):
        assert batch["input_ids"][row, :len(expected)].tolist() == expected and expected[-1] == tok.eos_token_id
        assert (batch["input_ids"][row, len(expected):] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * (width - len(expected))
    for row, expected in enumerate(labels):
        assert batch["labels"][row, :len(expected)].tolist() == expected
        assert (batch["labels"][row, len(expected):] == -100).all()
    # an empty reply (scoring the chance of ending at once) is </s> alone, as the tokenizer encodes text_target=""
    assert encode_pairs(tok, [("Hi", "")])["labels"].tolist() == [tok(text_target="")["input_ids"]] == [[2]]


def test_roles_count_back_from_the_reply_and_persona_comes_first(tok):
    # an even number of context turns: the newest is the user's, so the oldest is the assistant's
    example = Example(("Hello.", "Hi, how are you?"), "Fine.", persona=("I love cats.",))
    got = encode_examples(tok, [example])["input_ids"][0].tolist()
    expected = ids(tok, " your persona: I love cats.\n Hello.   Hi, how are you?")
    assert got == expected
    # the same ids chat builds from that history (the assistant turn as a generated reply: leading space)
    chat = [{"role": "system", "content": "I love cats."}, {"role": "assistant", "content": " Hello."},
            {"role": "user", "content": "Hi, how are you?"}]
    assert got == build_conversation_ids(tok, chat)
    # and from the bot's turn without its space (typed, or stripped by a client): as the model wrote it
    assert got == build_conversation_ids(tok, [chat[0], {"role": "assistant", "content": "Hello."}, chat[2]])
    history = ChatHistory(tok, persona=["I love cats."])
    history.add_reply("Hello.")
    history.add_user("Hi, how are you?")
    assert got == history.input_ids()


def test_fixed_width_and_left_truncation(tok):
    long_context = " ".join(["word"] * 200)
    batch = encode_pairs(tok, [(long_context, "Ok.")], max_length=16, width=20)
    assert batch["input_ids"].shape == (1, 20)
    row = batch["input_ids"][0, :16].tolist()
    assert row == ids(tok, " " + long_context)[-16:]  # newest tokens kept, </s> last
    assert row[-1] == tok.eos_token_id and batch["attention_mask"][0].sum() == 16
    with pytest.raises(ValueError, match="width"):
        encode_pairs(tok, [("Hello there, how are you doing today?", "Fine.")], width=3)


def test_files_jsonl_tsv_and_conversations(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    lines = [{"context": "Hi!", "reply": "Hello."},
             {"context": ["A.", "B.", "C?"], "reply": "D.", "persona": ["I sing."]},
             {"turns": ["one", "two", "three"], "persona": ["I run."]}]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    data = TrainingData(str(jsonl))
    assert len(data) == 4 and data.bad_lines == 0
    assert data[0] == Example(("Hi!",), "Hello.")
    assert data[1] == Example(("A.", "B.", "C?"), "D.", ("I sing.",))
    assert [data[2], data[3]] == [Example(("one",), "two", ("I run.",)), Example(("one", "two"), "three", ("I run.",))]
    ndjson = tmp_path / "d.NDJSON"  # JSON Lines by its other name
    ndjson.write_text(jsonl.read_text())
    assert [TrainingData(str(ndjson))[i] for i in range(4)] == [data[i] for i in range(4)]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("Hi!\tHello.\nx\ty\tz\n")
    data = TrainingData(str(tsv))
    assert [data[i] for i in range(len(data))] == [Example(("Hi!",), "Hello."), Example(("x",), "y"),
                                                    Example(("x", "y"), "z")]


@pytest.mark.parametrize("name,text,line,why", [
    ("d.jsonl", '{"context": "a", "reply": "b"}\n{"context": "a", "reply": \n', 2,
     "not valid JSON \\(Expecting value at column 27\\)"),  # past the line's end, not column 1 of the next
    ("d.json", '[{"context": "a",\n', 1, "read as JSON Lines, one object per line, because of its name"),
    ("d.csv", 'a,b\n', 1, "read as tab-separated context<TAB>reply lines, because its name"),
    ("d.jsonl", '{"context": "a", "reply": "b"}\n\n{"context": "a"}\n', 3, '"reply"'),
    ("d.jsonl", '{"context": ["a", 3], "reply": "b"}\n', 1, "context must be"),
    ("d.jsonl", '["a", "b"]\n', 1, "JSON object"),
    ("d.jsonl", '{"turns": ["only one"]}\n', 1, "at least 2 turns"),
    ("d.tsv", "a\tb\nno tab\n", 2, "context<TAB>reply"),
    ("d.tsv", "a\tb\na\t \n", 2, "non-empty"),
])
def test_a_bad_line_is_named_or_skipped(tmp_path, name, text, line, why):
    path = tmp_path / name
    path.write_text(text + ("a\tb\n" if name.endswith(("tsv", "csv")) else '{"context": "a", "reply": "b"}\n'))
    with pytest.raises(InputError, match=rf"{path}, line {line}: .*{why}.*--skip-bad-lines"):
        TrainingData(str(path))
    data = TrainingData(str(path), skip_bad_lines=True)
    assert data.bad_lines == 1 and all(isinstance(data[i], Example) for i in range(len(data)))


def test_no_examples_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TrainingData(str(tmp_path / "missing.tsv"))
    with pytest.raises(InputError, match="is a folder; give a file"):
        TrainingData(str(tmp_path))
    (tmp_path / "empty.tsv").write_text("\n\n")
    with pytest.raises(InputError, match="no training examples"):
        TrainingData(str(tmp_path / "empty.tsv"))


def test_a_file_is_indexed_not_held(tmp_path):
    """Files larger than memory stream: the index keeps a byte offset per example, the text stays on disk."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    line = {"context": ["Hello there, how was your day at work today?"] * 3, "reply": "It was long but good. " * 4}
    with open(path, "w") as f:
        for i in range(20000):
            f.write(json.dumps(dict(line, reply=f"{i} {line['reply']}")) + "\n")
    size = path.stat().st_size  # ~6 MB
    tracemalloc.start()
    try:
        data = TrainingData(str(path))
        last = data[len(data) - 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    data.close()
    assert len(data) == 20000 and last.reply.startswith("19999 ")
    assert peak < size / 10, (peak, size)  # ~20 bytes an example (a list of ints took ~70)


def test_a_header_row_names_the_columns(tmp_path):
    """A spreadsheet's tab-separated export starts with its column names: that line is no dialogue."""
    for header in ("context\treply", "Context\tReply", "prompt\tresponse"):
        path = tmp_path / "d.tsv"
        path.write_bytes(("\ufeff" + header + "\r\nHi!\tHello.\r\n").encode())
        data = TrainingData(str(path))
        assert len(data) == 1 and data[0] == Example(("Hi!",), "Hello.")
    path.write_text("Hi!\tHello.\ncontext\treply\n")  # only the first line is a header
    assert len(TrainingData(str(path))) == 2
