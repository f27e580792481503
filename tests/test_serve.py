"""`blenderbot-mb serve` through its ASGI app: replies equal the library's one-at-a-time replies, streaming,
conversations, bad input. The oracle is the PyTorch backend's generate() on one conversation at a time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402
from test_cli import default_model_folder  # noqa: E402

from blenderbot_mb.serve import SQLiteStore, create_app  # noqa: E402
from blenderbot_mb.serve.engine import Job  # noqa: E402
from blenderbot_mb.serve.server import load_engine  # noqa: E402

MODEL = "tiny"
PERSONA = [{"role": "system", "content": "I love cats."}]


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> str:
    return default_model_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def oracle(serve_model):
    """reply(messages, **settings): the PyTorch backend's reply to one conversation, persona kept when cut."""
    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.tokenizer import BlenderbotTokenizer
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    tokenizer = BlenderbotTokenizer.from_pretrained(serve_model)
    model = BlenderbotForConditionalGeneration.from_pretrained(serve_model).eval()

    def tokens(messages, n: int = 1, max_tokens: int | None = None, **settings) -> list[list[int]]:
        """The generated ids of each reply, after the start token, up to and including EOS. `max_tokens`: the
        request's, which counts the reply's text (docs/serve.md): one step more for an EOS the model forces."""
        if max_tokens is not None:
            forced = model.generation_config.forced_eos_token_id is not None
            settings["max_new_tokens"] = max_tokens + 1 if forced and max_tokens < 127 else max_tokens
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ids = build_conversation_ids(tokenizer, messages, max_length=128, keep_persona=True)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), num_return_sequences=n, **settings)
        rows = [row.tolist()[1:] for row in out]
        return [row[:row.index(model.config.eos_token_id) + 1] if model.config.eos_token_id in row else
                [t for t in row if t != model.config.pad_token_id] for row in rows]

    def reply(messages, n: int = 1, max_tokens: int | None = None, **settings):
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens(messages, n, max_tokens, **settings)]
        return texts if n > 1 else texts[0]

    def log_probs(messages, reply: list[int]) -> np.ndarray:
        """[len(reply), V] float64 log-softmax (numpy) of the model's logits teacher-forced on the reply."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ids = build_conversation_ids(tokenizer, messages, max_length=128, keep_persona=True)
        start = model.generation_config.decoder_start_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]),
                           decoder_input_ids=torch.tensor([[start, *reply[:-1]]])).logits[0].double().numpy()
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    reply.tokenizer, reply.tokens, reply.log_probs = tokenizer, tokens, log_probs
    return reply


def make_app(folder, store, **options):
    return create_app(load_engine(folder, **options), store, MODEL)


@pytest.fixture(scope="module")
def client(serve_model, tmp_path_factory):
    app = make_app(serve_model, SQLiteStore(str(tmp_path_factory.mktemp("store") / "conversations.sqlite3")))
    with TestClient(app) as c:
        yield c
    app.state.engine.stop()


def sse_events(text: str) -> list:
    """The data payloads of a Server-Sent Events body, [DONE] as a str."""
    out = []
    for event in text.split("\n\n"):
        data = "\n".join(line[6:] for line in event.splitlines() if line.startswith("data: "))
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(events, choice: int = 0) -> str:
    return "".join(c["delta"].get("content", "") for e in events if isinstance(e, dict)
                   for c in e.get("choices", []) if c["index"] == choice)


def chat(client, messages, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body})


# ---------------------------------------------------------------------- chat completions
def test_chat_completion_is_the_library_reply(client, oracle):
    messages = [*PERSONA, {"role": "user", "content": "Do you have any pets?"}]
    r = chat(client, messages)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": oracle(messages)}
    assert choice["finish_reason"] in ("stop", "length")
    expected_reply = oracle.tokenizer(oracle(messages)).input_ids  # reply + </s>
    assert body["usage"]["completion_tokens"] == len(expected_reply)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_developer_messages_are_persona_lines(client, oracle):
    """OpenAI's newer clients send the system prompt as role "developer": a persona line, as "system" is."""
    messages = [{"role": "developer", "content": "I love cats."}, {"role": "user", "content": "Do you have pets?"}]
    expected = oracle([{"role": "system", "content": "I love cats."}, messages[1]])
    assert expected != oracle(messages[1:])  # the persona changes the reply
    assert chat(client, messages).json()["choices"][0]["message"]["content"] == expected


def test_text_parts_and_history(client, oracle):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": " Hello, how are you?"},
                {"role": "user", "content": [{"type": "text", "text": "Fine, "}, {"type": "text", "text": "thanks."}]}]
    expected = oracle([*messages[:2], {"role": "user", "content": "Fine, thanks."}])
    assert chat(client, messages).json()["choices"][0]["message"]["content"] == expected


def test_stream_deltas_add_up_to_the_reply(client, oracle):
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    r = chat(client, messages, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert streamed_text(events) == oracle(messages)
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] in (
        ["stop"], ["length"])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0


def test_sampling_with_seed_is_repeatable(client, oracle):
    messages = [{"role": "user", "content": "Tell me about your weekend."}]
    first = chat(client, messages, temperature=1.3, seed=11, max_tokens=12).json()
    again = chat(client, messages, temperature=1.3, seed=11, max_tokens=12).json()
    expected = oracle(messages, do_sample=True, num_beams=1, temperature=1.3, seed=11, max_tokens=12)
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"] == expected
    # vLLM's min_p alone turns sampling on, as top_p and top_k do
    min_p = chat(client, messages, min_p=0.3, seed=11, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert min_p == oracle(messages, do_sample=True, num_beams=1, min_p=0.3, seed=11, max_tokens=12)


def test_logit_bias_is_added_to_the_logits(client, oracle):
    """OpenAI's logit_bias (the library's sequence_bias of one-token sequences): -100 on the greedy reply's first
    token gives the reply the library gives with that bias, which starts otherwise; bad keys, biases beyond 100
    and ids outside the vocabulary are a 400 naming logit_bias."""
    messages = [{"role": "user", "content": "Hi! How are you?"}]
    plain = oracle.tokens(messages, num_beams=1, do_sample=False, max_tokens=8)[0]
    biased = oracle.tokens(messages, num_beams=1, do_sample=False, max_tokens=8, sequence_bias=[[[plain[0]], -100.0]])[0]
    assert biased[0] != plain[0]
    r = chat(client, messages, temperature=0, max_tokens=8, logit_bias={str(plain[0]): -100})
    assert r.json()["choices"][0]["message"]["content"] == oracle.tokenizer.decode(biased, skip_special_tokens=True)
    vocab = oracle.tokenizer.vocab_size
    for bias, words in (({"1": 100.5}, "less than or equal to 100"), ({"-3": 1}, "decimal integers"),
                        ({str(vocab + 5): 1}, "not in the model's vocabulary")):
        error = chat(client, messages, logit_bias=bias).json()["error"]
        assert error["param"] == "logit_bias" and words in error["message"], (bias, error)


def test_beams_and_n_choices(client, oracle):
    messages = [{"role": "user", "content": "What do you do for work?"}]
    body = chat(client, messages, num_beams=3, n=2, no_repeat_ngram_size=2, max_tokens=15).json()
    expected = oracle(messages, n=2, num_beams=3, no_repeat_ngram_size=2, max_tokens=15)
    assert [c["message"]["content"] for c in body["choices"]] == expected
    events = sse_events(chat(client, messages, num_beams=3, n=2, no_repeat_ngram_size=2, max_tokens=15,
                             stream=True).text)
    assert [streamed_text(events, c) for c in range(2)] == expected


def test_repetition_and_length_penalties(client, oracle):
    """repetition_penalty, length_penalty, presence_penalty and frequency_penalty reach generate(): each
    request's reply is the library's with those settings, and differs from the model's own setting (the default
    model's repetition_penalty 1.4)."""
    messages = [{"role": "user", "content": "Tell me about your family and your family's family."}]
    replies = {}
    for settings in (dict(repetition_penalty=1.0), dict(repetition_penalty=3.0), dict(num_beams=3, length_penalty=-2.0),
                     dict(num_beams=3, length_penalty=2.0), dict(repetition_penalty=1.0, presence_penalty=1.5),
                     dict(repetition_penalty=1.0, frequency_penalty=-2.0)):
        body = chat(client, messages, temperature=0, max_tokens=20, **settings).json()
        expected = oracle(messages, do_sample=False, max_tokens=20, **{"num_beams": 1, **settings})
        replies[str(settings)] = body["choices"][0]["message"]["content"]
        assert replies[str(settings)] == expected, (settings, body)
    assert len(set(replies.values())) > 4, replies  # the settings change the replies
    for bad in (dict(repetition_penalty=0), dict(repetition_penalty="1.2"), dict(length_penalty=11),
                dict(frequency_penalty=-2.1), dict(presence_penalty=True)):
        r = chat(client, messages, **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/health").json()["status"] == "ok"


# ---------------------------------------------------------------------- conversations
def test_conversation_lifecycle(client, oracle):
    r = client.post("/v1/conversations", json={"persona": ["I love cats."]})
    assert r.status_code == 201
    conv = r.json()
    assert len(conv["id"]) == 32 and int(conv["id"], 16) >= 0  # 128 random bits as hex
    assert conv["messages"] == PERSONA
    history = list(PERSONA)
    for text in ("Hello! How are you today?", "Do you have any pets?"):
        history.append({"role": "user", "content": text})
        r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": text})
        assert r.status_code == 200, r.text
        assert r.json()["message"] == {"role": "assistant", "content": oracle(history)}
        history.append(r.json()["message"])
    assert client.get(f"/v1/conversations/{conv['id']}").json()["messages"] == history
    # streamed turns are stored too
    history.append({"role": "user", "content": "What is your favorite food?"})
    r = client.post(f"/v1/conversations/{conv['id']}/messages",
                    json={"content": "What is your favorite food?", "stream": True})
    events = sse_events(r.text)
    assert events[0]["conversation_id"] == conv["id"] and streamed_text(events) == oracle(history)
    assert client.get(f"/v1/conversations/{conv['id']}").json()["messages"][-1]["content"] == oracle(history)

    assert client.delete(f"/v1/conversations/{conv['id']}").status_code == 204
    for method, path, body in (("GET", "", None), ("DELETE", "", None), ("POST", "/messages", {"content": "Hi"})):
        r = client.request(method, f"/v1/conversations/{conv['id']}{path}", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"


def test_long_history_keeps_persona_and_newest_turns(client, oracle):
    persona = ["I love cats.", "I live in Paris."]
    conv = client.post("/v1/conversations", json={"persona": persona}).json()
    for i in range(12):
        r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": f"Message number {i} here."})
        assert r.status_code == 200
    messages = client.get(f"/v1/conversations/{conv['id']}").json()["messages"]
    assert len(messages) == 2 + 24
    ids = oracle.tokenizer(" ".join(m["content"] for m in messages)).input_ids
    assert len(ids) > 128  # the history no longer fits: it was cut for the last replies
    r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "Tell me about you."})
    context = [*messages, {"role": "user", "content": "Tell me about you."}]
    assert r.json()["message"]["content"] == oracle(context)
    from blenderbot_mb.conversation import build_conversation_ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        text = oracle.tokenizer.decode(build_conversation_ids(oracle.tokenizer, context, 128, keep_persona=True))
    assert text.startswith(" your persona: I love cats.\nyour persona: I live in Paris.\n")
    assert text.endswith(" Tell me about you.</s>") and "Message number 0 " not in text


# ---------------------------------------------------------------------- bad input
BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("unknown field", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_calls": []}, 400,
     "unsupported_field"),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
    ("too many tokens", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, 400,
     "invalid_value"),
    ("greedy n > 1", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3, "num_beams": 1}, 400,
     "invalid_value"),
    ("bad role", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value"),
    ("last not user", {"model": MODEL, "messages": [{"role": "user", "content": "x"},
                                                    {"role": "assistant", "content": "y"}]}, 400, "invalid_value"),
    ("persona after turns", {"model": MODEL, "messages": [{"role": "user", "content": "x"},
                                                          {"role": "system", "content": "p"},
                                                          {"role": "user", "content": "y"}]}, 400, "invalid_value"),
    ("temperature out of range", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "temperature": 7}, 400, "invalid_value"),
    ("no messages", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}, 413,
     "body_too_large"),
    ("not UTF-8", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe hi"}]}', 400,
     "invalid_json"),
    ("logit bias not keyed by ids", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                     "logit_bias": {"cat": 2}}, 400, "invalid_value"),
    ("penalty out of range", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "presence_penalty": 2.5}, 400, "invalid_value"),
    ("five stop strings", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                           "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ("empty stop string", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ""}, 400,
     "invalid_value"),
    ("stream as a string", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "invalid_value"),
    ("number as a string", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "0.7"},
     400, "invalid_value"),
    ("fractional max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5},
     400, "invalid_value"),
    ("form body", b"model=tiny&messages=hi", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("what, body, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx_and_the_server_goes_on(client, what, body, status, code):
    if isinstance(body, bytes):
        kind = "application/json" if status != 415 else "application/x-www-form-urlencoded"  # curl -d's default
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": kind})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if what in ("persona after turns", "last not user", "no messages", "bad role"):
        assert error["param"] and error["param"].startswith("messages"), error
    assert chat(client, [{"role": "user", "content": "Hi!"}]).status_code == 200


def test_bad_conversation_requests(client):
    assert client.get("/v1/conversations/not-an-id").status_code == 404
    assert client.post("/v1/conversations", json={"persona": "one string"}).status_code == 400
    conv = client.post("/v1/conversations").json()
    r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "hi", "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": ""})
    assert r.status_code == 400
    assert client.get(f"/v1/conversations/{conv['id']}").json()["messages"] == []  # nothing half-stored
    chunked = client.post("/v1/chat/completions", content=iter([b"x" * 40000, b"y" * 40000]))
    assert chunked.status_code == 413  # no Content-Length: counted while reading


def test_metrics(client):
    chat(client, [{"role": "user", "content": "Hi!"}])
    text = client.get("/metrics").text
    for name in ("blenderbot_mb_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
                 "blenderbot_mb_request_latency_seconds_bucket", "blenderbot_mb_batch_size_bucket",
                 "blenderbot_mb_generated_tokens_total", "blenderbot_mb_generated_tokens_per_second",
                 "blenderbot_mb_requests_in_flight 0.0"):
        assert name in text
    tokens = next(line for line in text.splitlines() if line.startswith("blenderbot_mb_generated_tokens_total"))
    assert float(tokens.split()[-1]) > 0


def test_page_is_served(client):
    """The page and its files; every path it uses is relative to the page, so that a proxy can serve it under a
    path of its own (https://example.org/bot/ -> this server's /)."""
    import re

    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"static/chat.js\">" in page.text
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert links and not [link for link in links if link.startswith("/")], links
    script = client.get("/static/chat.js")
    assert script.status_code == 200 and "v1/conversations" in script.text
    assert not re.search(r"""["'`]/(v1|static)/""", script.text)


# ---------------------------------------------------------------------- helpers for the other test_serve files
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """The app under a real uvicorn on a free localhost port, in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def require_program(name: str) -> str:
    """The path of a system program the test needs: skipped where it is missing, but under CI=true (where
    the test command installs it) a missing program fails the test."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {name})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_streamer_sends_whole_characters(oracle):
    """Token by token, a multi-byte character split over byte tokens goes out once complete."""
    import numpy as np

    from blenderbot_mb.serve.engine import Job, _Streamer

    text = " Café ✓ naïve 🙂 done"
    tokens = oracle.tokenizer(text).input_ids  # ... </s>
    deltas = []
    job = Job(ids=[2], kwargs={}, n=1, max_new_tokens=60, stream=True,
              on_event=lambda kind, payload: deltas.append(payload[1]))
    streamer = _Streamer([job], oracle.tokenizer, eos=2)
    streamer.put(np.array([[1]]))  # the start token: not text
    for token in tokens:
        streamer.put(np.array([[token]]))
    streamer.end()
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert len(deltas) > 5


def test_streaming_comes_token_by_token(client):
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    for settings in ({"num_beams": 1}, {"temperature": 0.7, "seed": 3}, {"num_beams": 3}):
        events = sse_events(chat(client, messages, stream=True, **settings).text)
        deltas = [c["delta"]["content"] for e in events[:-1] for c in e["choices"] if c["delta"].get("content")]
        assert len(deltas) > (5 if not settings.get("num_beams") else 1), settings


def test_beam_search_streams_what_the_beams_agree_on(client, oracle, monkeypatch):
    """The model's own beam search (5 beams): the settled prefix streams early, in several pieces that add up
    to the reply, and each input of a batch advances on its own: batched with a request whose beams settle
    later, a reply streams in the same pieces as alone."""
    import threading

    engine = client.app.state.engine
    prompts = ["What is your favorite food?", "Do you have any pets?", "Where are you from?",
               "What do you do for a living?", "Tell me about yourself.", "Do you like music?"]
    conversations = [[*PERSONA, {"role": "user", "content": p}] for p in prompts]

    def stream(batch):  # the streamed pieces of each conversation, decoded together in one batch
        monkeypatch.setattr(engine, "max_wait", 5.0 if len(batch) > 1 else 0.0)  # wait for the whole batch
        monkeypatch.setattr(engine, "max_batch", len(batch))
        deltas, results, done = {i: [] for i in range(len(batch))}, {}, threading.Event()

        def on_event(i):
            def handle(kind, payload):
                if kind == "delta":
                    deltas[i].append(payload[1])
                else:
                    results[i] = payload
                    if len(results) == len(batch):
                        done.set()
            return handle

        for i, messages in enumerate(batch):
            assert engine.submit(Job(ids=engine.encode(messages), kwargs={}, n=1, max_new_tokens=60, stream=True,
                                     on_event=on_event(i)))
        assert done.wait(120) and all(r.batch_size == len(batch) for r in results.values())
        return [deltas[i] for i in range(len(batch))]

    alone = [stream([c])[0] for c in conversations]
    for messages, pieces in zip(conversations, alone, strict=True):
        assert "".join(pieces) == oracle(messages)
    early = max(range(len(alone)), key=lambda i: len(alone[i]))  # settles in the most pieces
    late = min(range(len(alone)), key=lambda i: len(alone[i]))  # settles last
    assert len(alone[early]) > 2 and len(alone[late]) < len(alone[early]), alone
    together = stream([conversations[late], conversations[early]])
    assert together == [alone[late], alone[early]], (together, alone)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_serves_bfloat16_weights(serve_model, tmp_path, device):
    """--dtype bfloat16 (the GPU load test's setting): replies equal the bfloat16 model's own generate()."""
    from blenderbot_mb.conversation import build_conversation_ids
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")), device=device, dtype="bfloat16")
    model = BlenderbotForConditionalGeneration.from_pretrained(serve_model).to(device, torch.bfloat16).eval()
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    ids = build_conversation_ids(app.state.engine.bot.tokenizer, messages, max_length=128, keep_persona=True)
    with TestClient(app) as c:
        for settings in (dict(temperature=0, num_beams=1, max_tokens=12), dict(max_tokens=12),
                         dict(temperature=0.8, seed=5, max_tokens=12)):
            # (max_tokens 12: 12 tokens of text, then the EOS the model forces)
            kwargs = dict(max_new_tokens=13, **({"do_sample": True, "num_beams": 1, "temperature": 0.8, "seed": 5}
                                                if "seed" in settings else {}),
                          **({"do_sample": False, "num_beams": 1} if settings.get("temperature") == 0 else {}))
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids], device=device), **kwargs)
            expected = app.state.engine.bot.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
            r = chat(c, messages, **settings)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected, settings
            assert streamed_text(sse_events(chat(c, messages, stream=True, **settings).text)) == expected
    app.state.engine.stop()


def test_a_failure_is_a_json_500_with_its_traceback_in_the_log(client, monkeypatch, caplog):
    engine = client.app.state.engine

    def broken(*args, **kwargs):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(engine.bot.model, "generate", broken)
    with caplog.at_level("ERROR", logger="blenderbot_mb"):
        r = chat(client, [{"role": "user", "content": "Hi!"}])
        events = sse_events(chat(client, [{"role": "user", "content": "Hi!"}], stream=True).text)
    assert r.status_code == 500 and "RuntimeError: device on fire" in r.json()["error"]["message"]
    assert any("device on fire" in e["error"]["message"] for e in events if isinstance(e, dict) and "error" in e)
    failures = [rec for rec in caplog.records if rec.exc_info and "device on fire" in str(rec.exc_info[1])]
    assert failures and "Traceback" in caplog.text
    monkeypatch.undo()

    caplog.clear()
    monkeypatch.setattr(client.app.state.store, "get", broken)  # a bug outside generate()
    with caplog.at_level("ERROR", logger="blenderbot_mb"), TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.get("/v1/conversations/" + "0" * 32)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "device on fire" in r.json()["error"]["message"]
    assert any(rec.exc_info and "device on fire" in str(rec.exc_info[1]) for rec in caplog.records)
    assert chat(client, [{"role": "user", "content": "Hi!"}]).status_code == 200  # the server goes on


def test_package_and_cli_import_no_web_stack():
    import subprocess
    import sys

    code = ("import sys, blenderbot_mb, blenderbot_mb.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'redis', 'torch', 'tensorflow', 'jax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_serve_extra_names_it():
    import subprocess
    import sys

    code = ("import sys, importlib.util\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'fastapi' else real(name, *a)\n"
            "from typer.testing import CliRunner\n"
            "from blenderbot_mb.cli import app\n"
            "r = CliRunner().invoke(app, ['serve'])\n"
            "print(r.exit_code, r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("2 error: ") and "blenderbot-mb[serve]" in out.stdout


def test_filler_rows_change_nothing(client, oracle, monkeypatch):
    """On CUDA a batch is padded with filler rows to a power of two; they must not reach any reply."""
    engine = client.app.state.engine
    monkeypatch.setattr(engine, "_rows", lambda size: size + 3)
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    assert chat(client, messages).json()["choices"][0]["message"]["content"] == oracle(messages)
    events = sse_events(chat(client, messages, n=2, temperature=0.8, seed=4, stream=True).text)
    assert [streamed_text(events, c) for c in range(2)] == oracle(messages, n=2, do_sample=True, num_beams=1,
                                                                  temperature=0.8, seed=4)


def test_seeded_requests_share_a_batch(client, oracle, monkeypatch):
    """Requests with different seeds (and one without) are decoded together; each seeded reply is the one
    the request gets alone."""
    import threading

    engine = client.app.state.engine
    monkeypatch.setattr(engine, "max_wait", 5.0)  # wait for the whole batch
    monkeypatch.setattr(engine, "max_batch", 3)
    settings = dict(do_sample=True, num_beams=1, temperature=0.9, max_new_tokens=12, num_return_sequences=2)
    conversations = [[{"role": "user", "content": text}] for text in ("Do you have any pets?", "Hi!", "I cook.")]
    results, done = {}, threading.Event()

    def on_event(i):
        def handle(kind, payload):
            if kind != "delta":
                results[i] = payload
                if len(results) == 3:
                    done.set()
        return handle

    for i, (messages, seed) in enumerate(zip(conversations, (7, 8, None), strict=True)):
        kwargs = dict(settings, **({} if seed is None else {"seed": seed}))
        assert engine.submit(Job(ids=engine.encode(messages), kwargs=kwargs, n=2, max_new_tokens=12,
                                 on_event=on_event(i)))
    assert done.wait(120)
    assert [results[i].batch_size for i in range(3)] == [3, 3, 3], results
    for i, seed in ((0, 7), (1, 8)):
        assert results[i].texts == oracle(conversations[i], n=2, seed=seed, **{
            k: v for k, v in settings.items() if k != "num_return_sequences"}), i


def test_batch_stops_when_every_client_left(client):
    """Mid-decode cancellation: once every client of a streaming batch has gone, generate() stops early
    and nothing is reported for the batch."""
    import threading

    engine = client.app.state.engine
    events, done = [], threading.Event()

    def on_event(kind, payload):
        events.append(kind)
        if kind == "delta":
            engine.cancel(job)  # the client leaves after the first piece of text
        else:
            done.set()

    ids = engine.encode([{"role": "user", "content": "Do you have any pets?"}])
    job = Job(ids=ids, kwargs={"max_new_tokens": 100, "min_new_tokens": 100}, n=1, max_new_tokens=100,
              on_event=on_event, stream=True)
    decoded = client.app.state.metrics.batch_size._sum.get()
    assert engine.submit(job)
    assert not done.wait(3)  # neither done nor error: the batch was dropped
    assert events == ["delta"] and client.app.state.metrics.batch_size._sum.get() == decoded
    assert chat(client, [{"role": "user", "content": "Hi!"}]).status_code == 200  # the decoder goes on


# ---------------------------------------------------------------------- OpenAI clients' habits
def test_temperature_zero_is_greedy(client, oracle):
    """OpenAI's temperature 0 is greedy decoding: one beam, not the model's own beam search."""
    messages = [{"role": "user", "content": "Tell me about your favorite hobby"}]
    greedy = oracle(messages, num_beams=1, do_sample=False)
    r = chat(client, messages, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy
    if greedy != oracle(messages):  # the model's default (beam search) would have said otherwise
        assert r.json()["choices"][0]["message"]["content"] != oracle(messages)


def test_neutral_values_of_unsupported_fields_are_accepted(client, oracle):
    """What clients send by default (no penalties, no logprobs, no tools, text responses) asks for nothing."""
    messages = [{"role": "user", "content": "Hi!"}]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "top_logprobs": None,
               "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "parallel_tool_calls": True, "stop": None}
    r = chat(client, messages, **neutral)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == oracle(messages)
    for field, value in (("logprobs", 0), ("tools", [{"type": "function"}])):
        r = chat(client, messages, **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def first_stop(text: str, stops: list[str]) -> str:
    """The text before the first occurrence of any stop string (OpenAI's `stop`), computed here by brute force."""
    cuts = [i for i in range(len(text)) if any(text.startswith(s, i) for s in stops)]
    return text[:cuts[0]] if cuts else text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_reply(client, oracle, stream):
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    full = oracle(messages)
    words = full.split()
    assert len(words) >= 3, full
    cases = [[words[1]], [words[-1][-2:], "zzz"], [words[2][:1] + "\u00e9"], "zzz"]  # hit, hit, miss, miss
    for stops in cases:
        listed = [stops] if isinstance(stops, str) else stops
        expected = first_stop(full, listed)
        r = chat(client, messages, stop=stops, stream=stream)
        assert r.status_code == 200, r.text
        if stream:
            events = sse_events(r.text)
            text = streamed_text(events)
            reason = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"]
                      if c["finish_reason"]][0]
        else:
            choice = r.json()["choices"][0]
            text, reason = choice["message"]["content"], choice["finish_reason"]
        assert text == expected, (stops, text)
        if expected != full:
            assert reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_decoding_ends_at_the_stop_string(client, oracle, stream):
    check_decoding_ends_at_the_stop_string(client, oracle, stream)


def check_decoding_ends_at_the_stop_string(client, oracle, stream):
    """A reply ends where its text first holds a stop string: greedy, the tokens counted are exactly those up to
    the one that completes it; beam search (the model's own, 1 choice) counts fewer than the whole reply."""
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    for settings, request in (({"num_beams": 1, "do_sample": False}, {"temperature": 0}), ({}, {})):
        full = oracle.tokens(messages, **settings)[0]
        text = oracle.tokenizer.decode(full, skip_special_tokens=True)
        stop = text.split()[1]
        upto = next(k for k in range(1, len(full) + 1)
                    if stop in oracle.tokenizer.decode(full[:k], skip_special_tokens=True))
        assert upto < len(full) - 1, text  # the stop comes well before the end
        r = chat(client, messages, stop=stop, stream=stream, **request,
                 **({"stream_options": {"include_usage": True}} if stream else {}))
        assert r.status_code == 200, r.text
        if stream:
            events = sse_events(r.text)
            got, used = streamed_text(events), [e for e in events if isinstance(e, dict) and e.get("usage")][-1]
        else:
            got, used = r.json()["choices"][0]["message"]["content"], r.json()
        assert got == first_stop(text, [stop])
        tokens = used["usage"]["completion_tokens"]
        assert (tokens == upto) if request else (upto <= tokens < len(full)), (settings, tokens, upto, len(full))


def test_stop_scan_holds_back_what_may_begin_a_stop_string():
    from blenderbot_mb.serve.app import StopScan

    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(list("abc "), size=int(rng.integers(0, 30))))
        stops = ["".join(rng.choice(list("abc"), size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 4)))]
        scan, out, i = StopScan(stops), "", 0
        while i < len(text):  # random pieces, as a stream's deltas come
            j = i + int(rng.integers(1, 5))
            out += scan.feed(text[i:j])
            assert not any(s in out for s in stops)
            i = j
        out += scan.finish()
        assert out == first_stop(text, stops), (text, stops, out)


def test_stop_in_a_conversation_saves_the_cut_reply(client, oracle):
    conv = client.post("/v1/conversations", json={}).json()
    full = oracle([{"role": "user", "content": "Hi!"}])
    stop = full.split()[1]
    r = client.post(f"/v1/conversations/{conv['id']}/messages",
                    json={"content": "Hi!", "stop": stop, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == first_stop(full, [stop])
    saved = client.get(f"/v1/conversations/{conv['id']}").json()["messages"]
    assert saved[-1]["content"] == first_stop(full, [stop])


def test_model_retrieve_and_head_health(client):
    r = client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert client.head("/health").status_code == 200


def test_overloaded_answer_says_when_to_retry(client, monkeypatch):
    monkeypatch.setattr(client.app.state.engine, "submit", lambda job: False)
    r = chat(client, [{"role": "user", "content": "Hi!"}])
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert r.headers["retry-after"] == "1"


def test_json_types_and_content_types(client, oracle):
    """JSON's integers are numbers (temperature 0 as 0), a charset parameter or a +json type is JSON; a body
    sent as text is refused by name."""
    messages = [{"role": "user", "content": "Hi!"}]
    greedy = chat(client, messages, temperature=0.0).json()["choices"][0]["message"]["content"]
    assert chat(client, messages, temperature=0).json()["choices"][0]["message"]["content"] == greedy
    body = json.dumps({"model": MODEL, "messages": messages, "temperature": 0}).encode()
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json", None):
        headers = {"content-type": kind} if kind else {}
        r = client.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy, (kind, r.text)
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = chat(client, messages, stream="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


def test_validation_errors_name_the_field_not_pydantic_types(client):
    r = chat(client, [{"role": "user", "content": None}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    r = chat(client, [{"role": "system", "content": "a persona"}])
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages" and "Value error" not in error["message"]


# ---------------------------------------------------------------------- logprobs
def check_logprobs(oracle, messages, choice: dict, reply: list[int], top: int) -> None:
    """A choice's `logprobs.content` against numpy's log-softmax of the model's logits on its reply: one entry
    per token of the text (the final EOS has none), each token's bytes, and the `top` likeliest at each place."""
    eos = oracle.tokenizer.eos_token_id
    tokens = reply[:-1] if reply and reply[-1] == eos else reply
    expected = oracle.log_probs(messages, reply)
    entries = choice["logprobs"]["content"]
    assert len(entries) == len(tokens)
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == choice["message"]["content"]
    for t, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        assert bytes(entry["bytes"]) == oracle.tokenizer.convert_tokens_to_string([
            oracle.tokenizer.convert_ids_to_tokens(token)]).encode()
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        assert entry["logprob"] == pytest.approx(expected[t, token], abs=1e-4)
        best = np.argsort(-expected[t], kind="stable")[:top]
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(expected[t, best].tolist(), abs=1e-4)
        assert [bytes(e["bytes"]) for e in entry["top_logprobs"]] == [
            oracle.tokenizer.token_bytes(int(i)) for i in best]


def test_logprobs_are_the_models_own_distribution(client, oracle):
    """logprobs: each reply token's log-probability under the model (before the request's decoding settings),
    beam search and sampling alike; top_logprobs the likeliest tokens at each place."""
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    cases = [(dict(), dict(), 3),
             (dict(temperature=1.3, seed=11, max_tokens=12, n=2),
              dict(do_sample=True, num_beams=1, temperature=1.3, seed=11, max_tokens=12, n=2), 0)]
    for request, settings, top in cases:
        body = chat(client, messages, logprobs=True, top_logprobs=top, **request).json()
        replies = oracle.tokens(messages, **settings)
        assert len(body["choices"]) == len(replies)
        for choice, reply in zip(body["choices"], replies, strict=True):
            assert choice["logprobs"]["refusal"] is None
            check_logprobs(oracle, messages, choice, reply, top)
    assert chat(client, messages).json()["choices"][0]["logprobs"] is None  # not asked for


def test_logprobs_end_with_the_text_at_a_stop_string(client, oracle):
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    full = oracle(messages)
    stop = full.split()[2]
    choice = chat(client, messages, logprobs=True, stop=stop).json()["choices"][0]
    text = choice["message"]["content"]
    assert text == first_stop(full, [stop])
    pieces = [bytes(e["bytes"]).decode() for e in choice["logprobs"]["content"]]
    assert "".join(pieces).startswith(text) and len("".join(pieces[:-1])) < len(text)  # the last token begins it


def test_streamed_logprobs_come_after_the_text_as_the_whole_replys(client, oracle):
    """stream with logprobs: each choice's entries in one chunk after its text and before its finish reason,
    equal to the whole reply's (and to numpy's log-softmax of the model's logits); at a stop string they end
    with the streamed text."""
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    whole = chat(client, messages, logprobs=True, top_logprobs=2, temperature=0.9, seed=3, n=2).json()
    events = sse_events(chat(client, messages, logprobs=True, top_logprobs=2, temperature=0.9, seed=3, n=2,
                             stream=True).text)
    replies = oracle.tokens(messages, do_sample=True, num_beams=1, temperature=0.9, seed=3, n=2)
    for c, (choice, reply) in enumerate(zip(whole["choices"], replies, strict=True)):
        mine = [(e["choices"][0], i) for i, e in enumerate(events) if isinstance(e, dict) and e["choices"]
                and e["choices"][0]["index"] == c]
        scored = [(x, i) for x, i in mine if x.get("logprobs")]
        assert len(scored) == 1 and scored[0][0]["delta"] == {}
        finish = next(i for x, i in mine if x["finish_reason"])
        last_text = max(i for x, i in mine if x["delta"].get("content"))
        assert last_text < scored[0][1] < finish
        assert streamed_text(events, c) == choice["message"]["content"]
        assert scored[0][0]["logprobs"] == choice["logprobs"]
        check_logprobs(oracle, messages, {**choice, "logprobs": scored[0][0]["logprobs"]}, reply, 2)
    stop = oracle(messages).split()[2]
    events = sse_events(chat(client, messages, logprobs=True, stop=stop, stream=True).text)
    pieces = [bytes(e["bytes"]).decode() for event in events if isinstance(event, dict) for x in event["choices"]
              if x.get("logprobs") for e in x["logprobs"]["content"]]
    text = streamed_text(events)
    assert text == first_stop(oracle(messages), [stop])
    assert "".join(pieces).startswith(text) and len("".join(pieces[:-1])) < len(text)


def test_logprobs_requests_that_cannot_be_answered(client):
    messages = [{"role": "user", "content": "Hi!"}]
    for body, param in ((dict(top_logprobs=2), "top_logprobs"),
                        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
                        (dict(logprobs="yes"), "logprobs")):
        r = chat(client, messages, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    conv = client.post("/v1/conversations").json()
    r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "hi", "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_field"


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_logprobs_agree_across_backends(serve_model, tmp_path, client, backend, caplog):
    """The same log-probabilities on every backend; and a reply ended at its stop string is no error in the log
    (JAX logged the planned stop of a host callback as a failure with its traceback)."""
    pytest.importorskip("tensorflow" if backend == "tf" else "flax")
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    want = chat(client, messages, logprobs=True, top_logprobs=2).json()["choices"][0]
    stopped = chat(client, messages, stop=want["message"]["content"].split()[1]).json()["choices"][0]
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")), backend=backend)
    with TestClient(app) as other:
        got = chat(other, messages, logprobs=True, top_logprobs=2).json()["choices"][0]
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert chat(other, messages, stop=want["message"]["content"].split()[1]).json()["choices"][0] == stopped
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    app.state.engine.stop()
    assert got["message"] == want["message"]
    for a, b in zip(got["logprobs"]["content"], want["logprobs"]["content"], strict=True):
        assert a["bytes"] == b["bytes"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
        assert [e["bytes"] for e in a["top_logprobs"]] == [e["bytes"] for e in b["top_logprobs"]]


# ---------------------------------------------------------------------- the request's own words
def test_setting_errors_name_the_request_field(client):
    """A setting the model cannot take is a 400 naming the request's field (not generate()'s name), with no
    server-side advice; settings at the edges of float32 are refused or read as OpenAI's clients mean them."""
    messages = [{"role": "user", "content": "Hi!"}]
    cases = [(dict(max_tokens=128), "max_tokens", "at most 127"),
             (dict(max_completion_tokens=100000), "max_completion_tokens", "at most 127"),
             (dict(min_tokens=200), "min_tokens", "at most 127"),
             (dict(min_tokens=10, max_tokens=5), "min_tokens", "at most max_tokens (5)"),
             (dict(n=2, temperature=0), "n", "need sampling"), (dict(n=4, num_beams=3), "n", "at most num_beams (3)"),
             (dict(top_k=10**8), "top_k", "less than or equal to 65536"),
             (dict(min_p=1.5), "min_p", "less than or equal to 1"),
             (dict(repetition_penalty=1e-300), "repetition_penalty", "greater than or equal to 0.01"),
             (dict(temperature=float("nan")), "temperature", "finite number"),
             (dict(stream_options={"include_usage": True}), "stream_options", "only with stream: true")]
    for body, param, words in cases:
        payload = json.dumps({"model": MODEL, "messages": messages, **body})  # (NaN as JavaScript writes it)
        r = client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and words in error["message"], (body, error)
        assert "BLENDERBOT_MB_LIMITS" not in error["message"]


def test_a_temperature_below_float32s_reach_is_greedy(client, oracle):
    messages = [{"role": "user", "content": "Hi! How are you?"}]
    greedy = oracle(messages, num_beams=1, do_sample=False, max_tokens=8)
    for temperature in (1e-40, 1e-300, 0):
        r = chat(client, messages, temperature=temperature, max_tokens=8, seed=1)
        assert r.json()["choices"][0]["message"]["content"] == greedy, (temperature, r.text)


def test_openai_fields_that_ask_for_nothing_here(client, oracle):
    """store: false, metadata and user are accepted and change nothing; text parts are bounded together; HEAD
    works wherever GET does."""
    messages = [{"role": "user", "content": "Hi!"}]
    r = chat(client, messages, store=False, metadata={"team": "a"}, user="u1")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == oracle(messages)
    assert chat(client, messages, store=True).json()["error"]["param"] == "store"
    parts = [{"type": "text", "text": "x" * 3000}, {"type": "text", "text": "y" * 3000}]
    r = chat(client, [{"role": "user", "content": parts}])
    assert r.status_code == 400 and "at most 4000 characters" in r.json()["error"]["message"]
    r = chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.type", r.text
    conv = client.post("/v1/conversations").json()
    assert client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "Hi!", "user": "u1"}
                       ).status_code == 200
    for path in ("/", "/v1/models", f"/v1/models/{MODEL}", "/health"):
        assert client.head(path).status_code == 200, path
    r = client.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "needs a JSON body" in r.json()["error"]["message"], r.text


def test_messages_as_the_openai_client_returns_them(client, oracle):
    """An assistant message dumped from a reply (`message.model_dump()`: refusal, tool_calls, function_call,
    audio, annotations at null) goes back into the history as its text; null for fields with a default (n,
    stream) is the default; an assistant's content may be null (an empty turn). Tool calls, and null content
    from anyone else, stay refused."""
    first = [{"role": "user", "content": "Hi!"}]
    before = chat(client, first, max_tokens=10).json()["choices"][0]["message"]
    dumped = {**before, "refusal": None, "tool_calls": None, "function_call": None, "audio": None,
              "annotations": []}
    history = [*first, dumped, {"role": "user", "content": "Do you have any pets?"}]
    r = chat(client, history, n=None, stream=None, max_tokens=10)
    assert r.status_code == 200, r.text
    plain = [*first, {"role": "assistant", "content": before["content"]}, history[-1]]
    assert r.json()["choices"][0]["message"]["content"] == oracle(plain, max_tokens=10)
    r = chat(client, [*first, {"role": "assistant", "content": None}, history[-1]], max_tokens=10)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == oracle(
        [*first, {"role": "assistant", "content": ""}, history[-1]], max_tokens=10)
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for messages, param in (([*first, {**dumped, "tool_calls": calls}, history[-1]], "messages.1.tool_calls"),
                            ([{"role": "user", "content": None}], "messages.0.content")):
        r = chat(client, messages)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_max_tokens_counts_the_text_as_openai(client, oracle):
    """max_tokens counts the reply's tokens of text: the default model forces an EOS at its last step, which
    comes after them (max_tokens 1 had given an empty reply). The reply of max_tokens n with min_tokens n is
    generate()'s with n + 1 new tokens, the last the EOS; usage and logprobs count n tokens."""
    messages = [{"role": "user", "content": "Hi! Do you like music?"}]
    eos = oracle.tokenizer.eos_token_id
    for n in (1, 5):
        choice = chat(client, messages, max_tokens=n, min_tokens=n, temperature=0, logprobs=True).json()
        row = oracle.tokens(messages, max_new_tokens=n + 1, min_new_tokens=n, num_beams=1, do_sample=False)[0]
        assert len(row) == n + 1 and row[-1] == eos
        assert choice["choices"][0]["message"]["content"] == oracle.tokenizer.decode(row, skip_special_tokens=True)
        assert choice["choices"][0]["message"]["content"].strip()
        assert choice["choices"][0]["finish_reason"] == "length"
        assert choice["usage"]["completion_tokens"] == n == len(choice["choices"][0]["logprobs"]["content"])


def test_request_ids_and_cross_origin_calls(serve_model, tmp_path, client):
    """Every answer carries an X-Request-Id (the client's, else a new one); browsers of the origins given may
    call the API (CORS preflight and headers), others get no CORS headers; by default none."""
    r = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    ids = {client.get("/v1/models").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 24 for i in ids)
    assert chat(client, [{"role": "user", "content": "Hi!"}], tools=[1]).headers["x-request-id"]  # errors too
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "https://a.example"}
                                                           ).headers
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")))
    app = create_app(app.state.engine, app.state.store, MODEL, allow_origins=("https://a.example",))
    with TestClient(app) as other:
        preflight = other.options("/v1/chat/completions", headers={
            "Origin": "https://a.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://a.example"
        r = chat(other, [{"role": "user", "content": "Hi!"}], max_tokens=3)
        assert r.status_code == 200
        r = other.get("/v1/models", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-origin" not in other.get("/v1/models", headers={"Origin": "https://b.example"}
                                                              ).headers
    app.state.engine.stop()
