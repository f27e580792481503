"""Training data: dialogue files and (context, reply) pairs -> padded arrays in the model's input format."""

import numpy as np
import pytest

from blenderbot_mb.data import corpus_pairs, encode_pairs, read_pairs
from blenderbot_mb.tokenizer import BlenderbotTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_folder):
    return BlenderbotTokenizer.from_pretrained(tokenizer_folder)


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
    # user turns get a leading space, turns are joined by two spaces, </s> closes (tokenizer.encode adds it)
    first = tok(" Do you have any pets?", add_prefix_space=False)["input_ids"]
    second = tok(" I love to cook.  Me too!   What do you make?", add_prefix_space=False)["input_ids"]
    # replies get a leading space, as the published models generate them
    labels = [tok(" Yes, a dog.", add_prefix_space=False)["input_ids"], tok(" Pasta.", add_prefix_space=False)["input_ids"]]
    width = max(map(len, [first, second, *labels]))
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"].dtype == np.int64
    for row, ids in enumerate([first, second]):
        assert batch["input_ids"][row, :len(ids)].tolist() == ids and ids[-1] == tok.eos_token_id
        assert (batch["input_ids"][row, len(ids):] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))
    for row, ids in enumerate(labels):
        assert batch["labels"][row, :len(ids)].tolist() == ids
        assert (batch["labels"][row, len(ids):] == -100).all()


def test_fixed_width_and_truncation(tok):
    long_context = " ".join(["word"] * 200)
    batch = encode_pairs(tok, [(long_context, "Ok.")], max_length=16, width=20)
    assert batch["input_ids"].shape == (1, 20)
    ids = batch["input_ids"][0, :16].tolist()
    assert ids[-1] == tok.eos_token_id and batch["attention_mask"][0].sum() == 16  # newest tokens kept
    with pytest.raises(ValueError, match="width"):
        encode_pairs(tok, [("Hello there, how are you doing today?", "Fine.")], width=3)
