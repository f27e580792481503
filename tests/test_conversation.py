"""Conversation builder: the expected strings are written by hand from the rule (user turns get a leading
space, bot turns one leading space, kept when they have it, turns joined with two spaces, `</s>` at the end,
ids cut from the left); the expected ids come from transformers' tokenizer encoding that string."""

import warnings

import numpy as np
import pytest

from blenderbot_mb.conversation import ChatHistory, Conversation, build_conversation_ids, conversation_text
from blenderbot_mb.errors import InputError
from blenderbot_mb.tokenizer import BlenderbotTokenizer, BlenderbotTokenizerFast

TURNS = ["Hello! How are you today?", " I'm doing well, thanks. And you?", "I just got back from a long run."]
TURNS_TEXT = " Hello! How are you today?   I'm doing well, thanks. And you?   I just got back from a long run.</s>"
PERSONA = ["I love cats.", "your persona: I have a dog."]
PERSONA_TEXT = " your persona: I love cats.\nyour persona: I have a dog.\n Hello! How are you today?</s>"


@pytest.fixture(scope="module")
def tokenizers(tokenizer_folder):
    return (BlenderbotTokenizer.from_pretrained(tokenizer_folder),
            BlenderbotTokenizerFast.from_pretrained(tokenizer_folder, add_prefix_space=True))


@pytest.fixture(scope="module")
def reference(tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.BlenderbotTokenizer.from_pretrained(tokenizer_folder, add_prefix_space=False)


def messages(turns, persona=()):
    roles = ["user", "assistant"]
    return [{"role": "system", "content": p} for p in persona] + [
        {"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_conversation_text_follows_the_rule():
    assert conversation_text(TURNS) == TURNS_TEXT
    assert conversation_text(messages(TURNS)) == TURNS_TEXT
    assert conversation_text(Conversation(TURNS)) == TURNS_TEXT
    assert conversation_text(messages(TURNS[:1], PERSONA)) == PERSONA_TEXT
    assert conversation_text([]) == "</s>"


@pytest.mark.parametrize("conversation,text", [(TURNS, TURNS_TEXT), (messages(TURNS[:1], PERSONA), PERSONA_TEXT),
                                               ([{"role": "assistant", "content": "Hi!"}], " Hi!</s>"),
                                               ([{"role": "assistant", "content": " Hi!"}], " Hi!</s>")])
def test_ids_match_reference_encoding(tokenizers, reference, conversation, text):
    expected = reference(text[: -len("</s>")])["input_ids"]
    assert expected[-1] == 2
    assert reference.encode(text, add_special_tokens=False) == expected
    for tok in tokenizers:  # both classes, whatever their add_prefix_space
        assert build_conversation_ids(tok, conversation) == expected
        assert tok.apply_chat_template(messages(conversation) if isinstance(conversation[0], str) else conversation) \
            == expected


def test_left_truncation_keeps_newest_turns_and_warns(tokenizers, reference):
    turns = [f"Turn number {i} says something fairly long about cats and dogs." for i in range(12)]
    text = "  ".join(" " + t for t in turns)  # the bot's turns too: a reply as the model writes it
    full = reference(text)["input_ids"]
    assert len(full) > 128
    for tok in tokenizers:
        with pytest.warns(UserWarning, match="kept the last 128"):
            ids = build_conversation_ids(tok, turns)
        assert ids == full[-128:] and ids[-1] == 2
        with pytest.warns(UserWarning):
            assert build_conversation_ids(tok, turns, max_length=20) == full[-20:]
        with pytest.warns(UserWarning):
            assert tok.apply_chat_template(messages(turns)) == full[-128:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short conversations do not warn
        build_conversation_ids(tokenizers[0], TURNS)


def test_apply_chat_template(tokenizers):
    slow, fast = tokenizers
    msgs = messages(TURNS, PERSONA)
    assert slow.apply_chat_template(msgs, tokenize=False) == fast.apply_chat_template(msgs, tokenize=False) == \
        " your persona: I love cats.\nyour persona: I have a dog.\n" + TURNS_TEXT
    ids = build_conversation_ids(slow, msgs)
    assert slow.apply_chat_template(msgs) == fast.apply_chat_template(msgs, add_generation_prompt=True) == ids
    arr = slow.apply_chat_template(msgs, return_tensors="np")
    assert arr.shape == (1, len(ids)) and arr.dtype == np.int64
    enc = slow.apply_chat_template(msgs, return_dict=True)
    assert enc.input_ids == ids and enc.attention_mask == [1] * len(ids)
    batch = slow.apply_chat_template([msgs, messages(TURNS[:1])])
    assert batch == [ids, build_conversation_ids(slow, TURNS[:1])]


def test_conversation_class(tokenizers):
    chat = Conversation(TURNS[0], persona=PERSONA[:1])
    chat.append_response(TURNS[1])
    chat.add_user_input("typo")
    with pytest.raises(InputError):
        chat.add_user_input("again")
    chat.add_user_input(TURNS[2], overwrite=True)
    assert list(chat.iter_texts()) == [(True, TURNS[0]), (False, TURNS[1]), (True, TURNS[2])]
    assert len(chat) == 4 and chat[0] == {"role": "system", "content": PERSONA[0]}
    assert build_conversation_ids(tokenizers[0], chat) == build_conversation_ids(
        tokenizers[0], messages(TURNS, PERSONA[:1]))


def test_bad_conversations(tokenizers):
    tok = tokenizers[0]
    for bad in ["just a string", [{"role": "robot", "content": "x"}], [{"role": "user"}], [3],
                [{"role": "user", "content": "hi"}, {"role": "system", "content": "late persona"}]]:
        with pytest.raises(InputError):
            build_conversation_ids(tok, bad)


# ---------------------------------------------------------------------- ChatHistory: ids kept, each turn encoded once
class CountingTokenizer:
    """Forwards to a tokenizer and records how many characters each call encodes."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, text, **kwargs):
        self.calls.append(len(text))
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def chat_turns(n):
    return [f"Turn {i}: do you like {'cats' if i % 3 else 'long walks'}?" if i % 2 == 0 else f" I do, number {i}."
            for i in range(n)]


@pytest.mark.parametrize("max_length, persona", [(None, ()), (128, ()), (40, PERSONA), (10, PERSONA)])
def test_chat_history_ids_equal_build_conversation_ids(tokenizers, max_length, persona):
    tok = tokenizers[0]
    history = ChatHistory(tok, max_length=max_length, persona=persona)
    turns = chat_turns(30)
    for i, turn in enumerate(turns):
        (history.add_user if i % 2 == 0 else history.add_reply)(turn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            want = build_conversation_ids(tok, messages(turns[: i + 1], persona), keep_persona=True,
                                          max_length=max_length)  # None: the tokenizer's model_max_length
        assert history.input_ids() == want, i
    history.reset()
    history.add_user("Hi!")
    assert history.input_ids() == build_conversation_ids(tok, messages(["Hi!"], persona), max_length=10**9)[
        -(max_length or 128):]


def test_chat_history_cost_per_turn_is_flat(tokenizers):
    """A turn encodes only its own text, whatever the length of the chat (no re-encoding of the history)."""
    tok = CountingTokenizer(tokenizers[0])
    history = ChatHistory(tok, max_length=128)
    turns = chat_turns(400)
    for i, turn in enumerate(turns):
        (history.add_user if i % 2 == 0 else history.add_reply)(turn)
        assert tok.calls[-1] <= len(turn) + 3  # the turn, its leading space and the two-space separator
        assert len(history.input_ids()) <= 128
    assert len(tok.calls) == 400
    assert sum(tok.calls) <= sum(len(t) + 3 for t in turns)


def test_chat_history_typed_special_tokens_are_text(tokenizers):
    tok = tokenizers[0]
    history = ChatHistory(tok, max_length=128)
    history.add_user("a </s> b <mask> <s> <pad>")
    ids = history.input_ids()
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert not set(ids[:-1]) & set(tok.all_special_ids)
    assert tok.decode(ids[:-1]) == " a </s> b <mask> <s> <pad>"


@pytest.mark.parametrize("text, words", [("x" * 100_001, "above the limit of 100000"),
                                         ("caf\udce9", "not valid text: character 3")])
def test_bad_turns_are_input_errors(tokenizers, text, words):
    with pytest.raises(InputError, match=words):
        ChatHistory(tokenizers[0]).add_user(text)
    with pytest.raises(InputError, match=words):
        build_conversation_ids(tokenizers[0], [text])
