"""Conversations -> encoder ids, in the format Blenderbot was converted with.

The rule (the reference's conversation builder, which kept bot turns as given, with one change):
- each user turn gets a leading space; bot turns read as the model writes them, with one leading space
  (a generated reply already has it, since its first token carries the `Ġ` space marker; one given
  without it, typed or stripped by a client, gets it, so that it encodes as the model wrote it and as
  training data encodes it);
- turns are joined with two spaces and `</s>` closes the string;
- the ids are truncated from the left to `model_max_length` (128) with a warning, so the newest turns survive.

    turns ["Hi!", " Hello, how are you?", "Fine."]  ->  " Hi!   Hello, how are you?   Fine.</s>"

Personas (our choice; the reference has none): system messages are persona lines, written ParlAI style
as `your persona: <text>`, joined with "\\n", given a leading space like a user turn, and placed before the
first turn, separated from it by "\\n":

    " your persona: I love cats.\\nyour persona: I have a dog.\\n Hi!</s>"

The string is encoded as it is: the tokenizer's add_prefix_space does not apply, so BlenderbotTokenizer and
BlenderbotTokenizerFast give the same ids.
"""

from __future__ import annotations

import logging
import warnings

from .errors import InputError
from .validation import check_text, short

logger = logging.getLogger(__name__)
PERSONA_PREFIX = "your persona: "
ROLES = ("user", "assistant", "system")


def _messages(conversation) -> list[dict]:
    """Accept a Conversation, a list of turns (str, user first, alternating) or a list of chat messages."""
    if hasattr(conversation, "messages"):
        conversation = conversation.messages
    if isinstance(conversation, str):
        raise InputError("a conversation is a list of turns or of {'role', 'content'} messages, not one str")
    messages = []
    for i, item in enumerate(conversation):
        if isinstance(item, str):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": item})
        elif isinstance(item, dict) and item.get("role") in ROLES and isinstance(item.get("content"), str):
            messages.append({"role": item["role"], "content": item["content"]})
        else:
            raise InputError(f"conversation entry {i} must be a str or a dict with role in {ROLES} and str "
                             f"content, got {short(item, 100)}")
        check_text(messages[-1]["content"], f"conversation entry {i}", turn=True)
    return messages


# `conversation_text` as a Jinja chat template, written into tokenizer_config.json on save so that
# transformers' apply_chat_template on a saved tokenizer builds the same string (transformers#33246)
CHAT_TEMPLATE = (
    "{%- set persona = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- for m in messages[persona | length:] if m['role'] == 'system' -%}"
    "{{ raise_exception('system (persona) messages must come before the first user/assistant turn') }}"
    "{%- endfor -%}"
    "{%- if persona -%}{{ ' ' }}"
    "{%- for m in persona -%}"
    "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{%- if not m['content'].startswith('" + PERSONA_PREFIX + "') -%}{{ '" + PERSONA_PREFIX + "' }}{%- endif -%}"
    "{{ m['content'] }}"
    "{%- endfor -%}"
    "{%- if turns -%}{{ '\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if not loop.first -%}{{ '  ' }}{%- endif -%}"
    "{%- if m['role'] == 'user' or not m['content'].startswith(' ') -%}{{ ' ' }}{%- endif -%}"
    "{{ m['content'] }}"
    "{%- endfor -%}"
    "{{ eos_token }}"
)


def _turn_text(text: str, user: bool) -> str:
    """A turn as the format writes it: a user's with a leading space, a bot's with one leading space as the
    model writes it (kept when it has one)."""
    return " " + text if user or not text.startswith(" ") else text


def conversation_text(conversation, eos_token: str = "</s>") -> str:
    """The conversation as one string in Blenderbot's format, ending in `eos_token`."""
    messages = _messages(conversation)
    persona = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    seen_turn = False
    for m in messages:
        if m["role"] == "system" and seen_turn:
            raise InputError("system (persona) messages must come before the first user/assistant turn")
        seen_turn = seen_turn or m["role"] != "system"
    text = "  ".join(_turn_text(m["content"], m["role"] == "user") for m in turns)
    if persona:
        lines = [p if p.startswith(PERSONA_PREFIX) else PERSONA_PREFIX + p for p in persona]
        text = " " + "\n".join(lines) + ("\n" + text if turns else "")
    return text + eos_token


def build_conversation_ids(tokenizer, conversation, max_length: int | None = None,
                           keep_persona: bool = False) -> list[int]:
    """Encoder ids of a conversation, cut from the left to `max_length` (default tokenizer.model_max_length).

    With `keep_persona=True` the persona lines survive the cut: the oldest turns after them go instead
    (unless the persona alone fills `max_length`; then the plain left cut applies)."""
    text = conversation_text(conversation, eos_token="")
    ids = tokenizer(text, add_prefix_space=False, add_special_tokens=True).input_ids  # text + </s>
    limit = tokenizer.model_max_length if max_length is None else max_length
    if limit is not None and len(ids) > limit:
        head = _persona_tokens(tokenizer, conversation, ids) if keep_persona else 0
        head = head if head < limit else 0
        dropped = len(ids) - limit
        message = (f"Conversation has {len(ids)} tokens; kept the last {limit - head}" +
                   (f" after the {head} persona tokens" if head else "") +
                   f" (model_max_length {limit}), dropping the oldest {dropped}.")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        ids = ids[:head] + ids[head + dropped:]
    return ids


def _persona_tokens(tokenizer, conversation, ids: list[int]) -> int:
    """How many leading ids of the encoded conversation are its persona lines (and their separator)."""
    messages = _messages(conversation)
    persona = [m for m in messages if m["role"] == "system"]
    if not persona or len(persona) == len(messages):
        return 0
    text = conversation_text(persona, eos_token="") + "\n"
    head = tokenizer(text, add_prefix_space=False, add_special_tokens=False).input_ids
    same = 0  # the shared prefix: byte-level BPE may merge the separator with a turn's leading spaces
    while same < min(len(head), len(ids)) and head[same] == ids[same]:
        same += 1
    return same


class ChatHistory:
    """A chat kept as token ids: each turn is encoded once, when it is added, and the oldest ids are dropped as
    new ones come, so a turn costs the same after a thousand turns as after one.

        >>> history = ChatHistory(tokenizer, max_length=128)
        >>> history.add_user("Hi! Do you have pets?")
        >>> reply_ids = model.generate(input_ids=[history.input_ids()])  # (schematic)
        >>> history.add_reply(tokenizer.decode(reply_ids[0], skip_special_tokens=True))

    The ids are those of `build_conversation_ids(tokenizer, turns, max_length, keep_persona=True)` when no
    turn ends in whitespace (each turn is encoded on its own, and byte-level BPE never merges across the
    spaces that separate turns), except that special tokens typed in a turn ("</s>", "<mask>") are text
    here, as a chat user means them. Truncation is silent: a long chat is expected to lose its oldest turns.
    """

    def __init__(self, tokenizer, max_length: int | None = None, persona: list[str] | tuple = ()):
        self.tokenizer = tokenizer
        self.max_length = tokenizer.model_max_length if max_length is None else max_length
        system = [{"role": "system", "content": p} for p in persona]
        self._persona = self._encode(conversation_text(system, eos_token="") + "\n") if persona else []
        self.reset()

    def reset(self) -> None:
        """Forget the turns (the persona stays)."""
        self._ids: list[int] = []  # the turns' ids, only as many as can still reach the model
        self._turns = 0

    def add_user(self, text: str) -> None:
        self._add(_turn_text(text, user=True), text)

    def add_reply(self, text: str) -> None:
        self._add(_turn_text(text, user=False), text)

    def _add(self, segment: str, text: str) -> None:
        check_text(text, "a conversation turn", turn=True)
        self._ids += self._encode(("  " if self._turns else "") + segment)
        self._turns += 1
        budget = self._turn_budget()
        if budget is not None and len(self._ids) > budget:
            del self._ids[: len(self._ids) - budget]

    def _turn_budget(self) -> int | None:
        """How many turn ids fit beside the persona and the closing </s> (all of them, with no limit)."""
        if self.max_length is None:
            return None
        head = len(self._persona) if len(self._persona) < self.max_length else 0
        return self.max_length - 1 - head

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_prefix_space=False, add_special_tokens=False,
                              split_special_tokens=True).input_ids

    def input_ids(self) -> list[int]:
        """The encoder input: persona, the newest turns, </s>; at most max_length ids."""
        ids = self._persona + self._ids + [self.tokenizer.eos_token_id]
        return ids if self.max_length is None else ids[len(ids) - min(len(ids), self.max_length):]

    def __len__(self) -> int:
        return self._turns


class Conversation:
    """A chat history: persona lines (system messages) first, then user and assistant turns.

        >>> chat = Conversation("Hi there!", persona=["I love cats."])
        >>> chat.append_response(" Hello! Do you have pets?")
        >>> chat.add_user_input("Two cats.")
        >>> list(chat.iter_texts())[-1]
        (True, 'Two cats.')
    """

    def __init__(self, text: str | list | None = None, persona: list[str] | None = None):
        self.messages: list[dict] = [{"role": "system", "content": p} for p in (persona or [])]
        if isinstance(text, str):
            self.add_user_input(text)
        elif text is not None:
            self.messages += _messages(text)

    def add_message(self, message: dict) -> None:
        self.messages += _messages([message])

    def add_user_input(self, text: str, overwrite: bool = False) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            if not overwrite:
                raise InputError("the last turn is already a user input; pass overwrite=True to replace it")
            self.messages.pop()
        self.add_message({"role": "user", "content": text})

    def append_response(self, response: str) -> None:
        self.add_message({"role": "assistant", "content": response})

    def iter_texts(self):
        """(is_user, text) for every turn, oldest first (persona lines excluded)."""
        for m in self.messages:
            if m["role"] != "system":
                yield m["role"] == "user", m["content"]

    def __iter__(self):
        return iter(self.messages)

    def __len__(self):
        return len(self.messages)

    def __getitem__(self, i):
        return self.messages[i]

    def __repr__(self):
        return "Conversation(" + "; ".join(f"{m['role']}: {m['content']!r}" for m in self.messages) + ")"


__all__ = ["ChatHistory", "Conversation", "build_conversation_ids", "conversation_text"]
