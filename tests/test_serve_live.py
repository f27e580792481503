"""`blenderbot-mb serve` over real HTTP: the openai client, many concurrent conversations decoded in batches
without mixing, a client leaving mid-stream, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_serve import MODEL, free_port, make_app, oracle, running_server, serve_model, sse_events  # noqa: E402,F401

from blenderbot_mb.serve import SQLiteStore  # noqa: E402


@pytest.fixture(scope="module")
def live(serve_model, tmp_path_factory):
    app = make_app(serve_model, SQLiteStore(str(tmp_path_factory.mktemp("live") / "c.sqlite3")),
                   max_batch=16, max_wait_ms=30)
    with running_server(app) as url:
        yield url, app
    app.state.engine.stop()


def test_openai_client(live, oracle):
    url, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "I love cats."}, {"role": "user", "content": "Do you have any pets?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30)
    assert reply.choices[0].message.content == oracle(messages, max_tokens=30)
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == reply.choices[
        0].message.content
    sampled = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.9, top_p=0.8, seed=5,
                                             n=2)
    assert [c.message.content for c in sampled.choices] == oracle(
        messages, n=2, do_sample=True, num_beams=1, temperature=0.9, top_p=0.8, seed=5)
    scored = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, logprobs=True,
                                            top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    penalized = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, presence_penalty=2,
                                               frequency_penalty=2, temperature=0)
    assert penalized.choices[0].message.content == oracle(messages, max_tokens=30, presence_penalty=2.0,
                                                          frequency_penalty=2.0, num_beams=1, do_sample=False)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=messages,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_concurrent_conversations_stay_apart(live, oracle):
    """Many conversations at once, each carrying its own marker: every reply is the one-at-a-time reply to
    that conversation's own history, no history holds another's marker, and requests were batched."""
    url, app = live
    metrics = app.state.metrics
    batches_before = metrics.batch_size._sum.get(), sum(b.get() for b in metrics.batch_size._buckets)
    conversations, turns = 8, 2

    async def one(client, k):
        marker = f"zq{k}x"
        conv = (await client.post("/v1/conversations", json={"persona": [f"My code word is {marker}."]})).json()
        settings = {"num_beams": 2} if k % 4 == 0 else {}  # a second group of compatible settings
        for t in range(turns):
            r = await client.post(f"/v1/conversations/{conv['id']}/messages",
                                  json={"content": f"{marker} turn {t}: do you like music?", **settings})
            assert r.status_code == 200, r.text
        return k, marker, settings, (await client.get(f"/v1/conversations/{conv['id']}")).json()

    async def everyone():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(one(client, k) for k in range(conversations)))

    results = asyncio.run(everyone())
    for k, marker, settings, conv in results:
        messages = conv["messages"]
        assert len(messages) == 1 + 2 * turns
        text = " ".join(m["content"] for m in messages)
        others = [f"zq{j}x" for j in range(conversations) if j != k]
        assert marker in text and not any(o in text for o in others)
        for t in range(turns):
            history = messages[:2 + 2 * t]
            assert messages[2 + 2 * t]["content"] == oracle(history, **settings), (k, t)
    total = sum(b.get() for b in metrics.batch_size._buckets) - batches_before[1]
    decoded = metrics.batch_size._sum.get() - batches_before[0]
    assert decoded == conversations * turns
    assert total < decoded  # some generate() calls decoded several requests together


def test_client_leaving_mid_stream_frees_its_slot(serve_model, tmp_path):
    """A streaming client that disconnects while its request waits: the job leaves the queue, is never
    decoded, and the in-flight count returns to zero. While it waited, the full queue refused another."""
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")), max_wait_ms=2000, max_queue=1)
    engine, metrics = app.state.engine, app.state.metrics
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "stream": True}
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()  # kept: a dropped line iterator closes the response
                assert next(lines).startswith("data: ") and engine.queued == 1
                refused = client.post("/v1/chat/completions", json={**body, "stream": False})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
            deadline = time.monotonic() + 10
            while (engine.queued or metrics.in_flight._value.get()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.queued == 0 and metrics.in_flight._value.get() == 0
            time.sleep(2.1)  # past the batching wait: nothing was decoded for it
            assert metrics.batch_size._sum.get() == 0
            r = client.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 200 and metrics.batch_size._sum.get() == 1
    engine.stop()


def test_a_client_that_leaves_a_queued_request_cancels_it(serve_model, tmp_path):
    """A client that is not streaming and gives up (its HTTP timeout) while its request waits in the queue:
    the request leaves the queue at once (logged 499), nothing is decoded for it."""
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")), max_wait_ms=2000)
    engine, metrics = app.state.engine, app.state.metrics
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}]}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 2
        while (engine.queued or metrics.in_flight._value.get()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.queued == 0 and metrics.in_flight._value.get() == 0  # (before the 2 s batching wait)
        time.sleep(1.6)  # past it: nothing was decoded
        assert metrics.batch_size._sum.get() == 0  # never decoded
        assert 'status="499"' in client.get("/metrics").text, [
            line for line in client.get("/metrics").text.splitlines() if "requests_total" in line]
    engine.stop()


def test_bad_store_or_log_level_ends_serve_at_once(tmp_path):
    """A --store that cannot be opened or an unknown --log-level: one `error:` line naming the option, exit
    code 2, before the model loads (the server had waited forever on its decoding process)."""
    for options, words in ((["--store", str(tmp_path)], f"--store {tmp_path}: cannot open it"),
                           (["--log-level", "bogus"], "--log-level must be one of critical, error, warning")):
        done = subprocess.run([sys.executable, "-m", "blenderbot_mb.cli", "serve", "--model",
                               str(tmp_path / "no-such-model"), "--port", str(free_port()), *options],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def start_server(serve_model, tmp_path, *options):
    """`blenderbot-mb serve` in a process of its own, once its /health answers 200: (process, url)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "blenderbot_mb.cli", "serve", "--model", serve_model, "--port", str(port),
         "--store", str(tmp_path / "c.sqlite3"), "--served-model-name", MODEL, *options],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(serve_model, tmp_path):
    server, url = start_server(serve_model, tmp_path, "--max-wait-ms", "3000")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Do you have any pets?"}]}
        in_flight = {}
        thread = threading.Thread(target=lambda: in_flight.update(
            r=httpx.post(url + "/v1/chat/completions", json=body, timeout=60)))
        thread.start()
        time.sleep(1.0)  # the request now waits for its batch (3 s)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "1"  # a load balancer takes it out
        thread.join(60)
        assert in_flight["r"].status_code == 200 and in_flight["r"].json()["choices"][0]["message"]["content"]
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_second_signal_ends_the_drain_at_once(serve_model, tmp_path):
    """The first SIGTERM drains; a second ends it at once, though two requests still wait (here 30 s for their
    batch): each gets a 503 it can read (a JSON error, a stream's error event), exit code 0 in a few seconds,
    the decoding process gone too."""
    server, url = start_server(serve_model, tmp_path, "--max-wait-ms", "30000")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Do you have any pets?"}]}
        answers = {}

        def ask(stream: bool):
            with contextlib.suppress(httpx.HTTPError):  # (the test fails below without an answer)
                answers[stream] = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream},
                                             timeout=60)

        threads = [threading.Thread(target=ask, args=(stream,), daemon=True) for stream in (False, True)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(url + "/health").status_code == 503  # draining
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
        assert time.monotonic() - started < 10, "the second signal did not end the drain at once"
        out = server.stdout.read()
        assert "stopping now: 2 request(s) in flight are cut" in out, out
        for thread in threads:
            thread.join(10)
        plain = answers[False]  # a JSON error the client can read, not a cut connection or a plain-text 500
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down", plain.text
        assert plain.headers["retry-after"] == "1"
        events = sse_events(answers[True].text)  # the stream had begun: its error event, then [DONE]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_requests_still_running_at_the_drain_timeout_are_answered_503(serve_model, tmp_path):
    """--drain-timeout 1: a request waiting (30 s) for its batch when SIGTERM comes is answered 503
    shutting_down a second later, and the server exits with code 0."""
    server, url = start_server(serve_model, tmp_path, "--max-wait-ms", "30000", "--drain-timeout", "1")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Do you have any pets?"}]}
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(
            r=httpx.post(url + "/v1/chat/completions", json=body, timeout=60)), daemon=True)
        thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0 and time.monotonic() - started < 10
        thread.join(10)
        assert answer["r"].status_code == 503 and answer["r"].json()["error"]["code"] == "shutting_down", answer
        assert "drain timeout: 1 request(s) in flight are cut" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_an_address_it_cannot_listen_on_is_one_error_line_before_the_model_loads(tmp_path):
    """A port in use, a port out of range, a host of another machine: `error:` and exit code 2 at once."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: address already in use"),
                 (["--port", "99999"], "--port must be from 0 to 65535, not 99999"),
                 (["--port", "-1"], "--port must be from 0 to 65535, not -1"),
                 (["--host", "203.0.113.7", "--port", "8000"], "cannot listen on 203.0.113.7:8000")]
        for options, words in cases:
            done = subprocess.run([sys.executable, "-m", "blenderbot_mb.cli", "serve", "--model",
                                   str(tmp_path / "no-such-model"), *options], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 2 and done.stderr.startswith("error: ") and words in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
