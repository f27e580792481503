"""The chat_template written into tokenizer_config.json renders our conversation format: transformers'
apply_chat_template on a tokenizer saved by us gives the ids of our own conversation code."""

import json

import pytest

from blenderbot_mb.conversation import CHAT_TEMPLATE, build_conversation_ids, conversation_text
from blenderbot_mb.tokenizer import BlenderbotTokenizer, BlenderbotTokenizerFast

CONVERSATIONS = [
    ["Hi!"],
    ["Hi!", " Hello, how are you?", "Fine. And you?"],
    ["Hello", "Hello back"],  # an assistant turn without a leading space
    [{"role": "system", "content": "I love cats."}, {"role": "system", "content": "your persona: I have a dog."},
     {"role": "user", "content": "Do you have pets?"}, {"role": "assistant", "content": " Yes, a dog."}],
    [{"role": "system", "content": "I am a chef."}],
    [{"role": "assistant", "content": " I start."}, {"role": "user", "content": "ok  two spaces"}],
    [{"role": "assistant", "content": "No space."}, {"role": "user", "content": "Then?"}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_template_renders_conversation_text(conversation):
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = [m if isinstance(m, dict) else {"role": ("user", "assistant")[i % 2], "content": m}
                for i, m in enumerate(conversation)]
    rendered = env.from_string(CHAT_TEMPLATE).render(messages=messages, eos_token="</s>")
    assert rendered == conversation_text(conversation)


@pytest.mark.parametrize("cls", [BlenderbotTokenizer, BlenderbotTokenizerFast])
def test_transformers_apply_chat_template_on_our_saved_tokenizer(tokenizer_folder, tmp_path, cls):
    transformers = pytest.importorskip("transformers")
    ours = cls.from_pretrained(tokenizer_folder)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conversation in CONVERSATIONS:
        messages = [m if isinstance(m, dict) else {"role": ("user", "assistant")[i % 2], "content": m}
                    for i, m in enumerate(conversation)]
        assert theirs.apply_chat_template(messages, tokenize=False) == conversation_text(conversation)
        encoded = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert list(encoded["input_ids"]) == build_conversation_ids(ours, messages)
    late_persona = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "I am late."}]
    with pytest.raises(Exception, match="must come before"):
        theirs.apply_chat_template(late_persona, tokenize=False)


@pytest.mark.parametrize("cls", [BlenderbotTokenizer, BlenderbotTokenizerFast])
def test_a_batch_of_conversations_pads_to_tensors_as_transformers(tokenizer_folder, tmp_path, cls):
    """padding / max_length / return_dict / return_tensors / tokenizer_kwargs as transformers'
    apply_chat_template on the saved folder gives them; what the format has no place for is refused."""
    transformers = pytest.importorskip("transformers")
    from blenderbot_mb.errors import InputError

    ours = cls.from_pretrained(tokenizer_folder)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    batch = [[{"role": "user", "content": m if isinstance(m, str) else m["content"]} if isinstance(m, str) else m
              for m in conversation] for conversation in CONVERSATIONS[:4]]
    for settings in (dict(padding=True), dict(padding="max_length", max_length=60),
                     dict(padding=True, tokenizer_kwargs={"pad_to_multiple_of": 8, "padding_side": "left"})):
        got = ours.apply_chat_template(batch, return_dict=True, return_tensors="np", **settings)
        want = theirs.apply_chat_template(batch, return_dict=True, return_tensors="np", **settings)
        for key in ("input_ids", "attention_mask"):
            assert got[key].tolist() == want[key].tolist(), (settings, key)
        ids = ours.apply_chat_template(batch, return_tensors="np", **settings)
        assert ids.tolist() == want["input_ids"].tolist()
    with pytest.raises(InputError, match="rows have different lengths"):
        ours.apply_chat_template(batch, return_tensors="np")
    for bad in (dict(tools=[{"name": "f"}]), dict(paddding=True), dict(continue_final_message=True),
                dict(tokenizer_kwargs={"truncation_side": "left"}), dict(padding="longer")):
        with pytest.raises(InputError, match="apply_chat_template|padding must be"):
            ours.apply_chat_template(batch, **bad)
