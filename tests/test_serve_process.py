"""`blenderbot-mb serve --engine process`: the model decodes in a child process. Replies, streams, seeds and
metrics equal the in-process engine's (the oracle is the PyTorch backend's generate() on one conversation);
a cancel reaches the child; a dead child fails its requests with a JSON 503 and /health says so; a model
that does not load is a one-line error at startup."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve import (  # noqa: E402,F401
    MODEL,
    PERSONA,
    chat,
    check_decoding_ends_at_the_stop_string,
    check_logprobs,
    make_app,
    oracle,
    running_server,
    serve_model,
    sse_events,
    streamed_text,
)

from blenderbot_mb.errors import InputError  # noqa: E402
from blenderbot_mb.serve import SQLiteStore, process  # noqa: E402
from blenderbot_mb.serve.engine import Job  # noqa: E402
from blenderbot_mb.serve.process import DecoderExited  # noqa: E402
from blenderbot_mb.serve.server import load_engine  # noqa: E402


@pytest.fixture(scope="module")
def client(serve_model, tmp_path_factory):
    app = make_app(serve_model, SQLiteStore(str(tmp_path_factory.mktemp("store") / "c.sqlite3")), engine="process")
    with TestClient(app) as c:
        yield c
    app.state.engine.stop(timeout=30)
    assert app.state.engine.process.exitcode == 0


def test_replies_streams_and_metrics(client, oracle):
    messages = [*PERSONA, {"role": "user", "content": "Do you have any pets?"}]
    assert client.get("/health").json()["status"] == "ok"
    r = chat(client, messages)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == oracle(messages)
    events = sse_events(chat(client, messages, stream=True, num_beams=1).text)
    deltas = [c["delta"]["content"] for e in events[:-1] for c in e["choices"] if c["delta"].get("content")]
    assert "".join(deltas) == oracle(messages, num_beams=1) and len(deltas) > 3
    sampled = chat(client, messages, temperature=0.9, seed=5, n=2, max_tokens=12).json()
    assert [c["message"]["content"] for c in sampled["choices"]] == oracle(
        messages, n=2, do_sample=True, num_beams=1, temperature=0.9, seed=5, max_tokens=12)
    beams = sse_events(chat(client, messages, num_beams=3, n=2, max_tokens=15, stream=True).text)
    assert [streamed_text(beams, c) for c in range(2)] == oracle(messages, n=2, num_beams=3, max_tokens=15)
    r = chat(client, messages, max_tokens=500)  # the request side validates in this process
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
    metrics = {line.split()[0]: float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("blenderbot_mb_")}
    assert metrics["blenderbot_mb_batch_size_count"] == 4 and metrics["blenderbot_mb_batch_size_sum"] == 4
    assert metrics["blenderbot_mb_generated_tokens_total"] > 20
    assert metrics["blenderbot_mb_queued_requests"] == 0


def test_decoding_ends_at_the_stop_string_in_the_child(client, oracle):
    check_decoding_ends_at_the_stop_string(client, oracle, stream=False)


def test_logprobs_from_the_child(client, oracle):
    messages = [{"role": "user", "content": "Do you have any pets?"}]
    choice = chat(client, messages, logprobs=True, top_logprobs=2).json()["choices"][0]
    check_logprobs(oracle, messages, choice, oracle.tokens(messages)[0], 2)


def test_cancel_mid_decode_reaches_the_child(client):
    """A streaming client leaves after its first piece of text: the child drops the batch (no batch is
    reported, no result comes back) and decodes the next request."""
    engine, metrics = client.app.state.engine, client.app.state.metrics
    kinds, done = [], threading.Event()

    def on_event(kind, payload):
        kinds.append(kind)
        if kind == "delta":
            engine.cancel(job)
        else:
            done.set()

    job = Job(ids=engine.encode([{"role": "user", "content": "Hi!"}]), n=1, max_new_tokens=100, stream=True,
              kwargs={"max_new_tokens": 100, "min_new_tokens": 100, "num_beams": 1}, on_event=on_event)
    decoded = metrics.batch_size._sum.get()
    assert engine.submit(job)
    assert not done.wait(3) and kinds == ["delta"]
    assert chat(client, [{"role": "user", "content": "Hi!"}]).status_code == 200  # the child goes on
    assert metrics.batch_size._sum.get() == decoded + 1  # the cancelled batch was never finished


def test_queued_cancel_and_a_dead_child(serve_model, tmp_path):
    """A client leaves while its request waits: the child never decodes it. Then the child dies with a
    request waiting: that request, and every later one, gets a JSON 503, and /health says unhealthy."""
    app = make_app(serve_model, SQLiteStore(str(tmp_path / "c.sqlite3")), engine="process", max_wait_ms=3000,
                   max_queue=1)
    engine, metrics = app.state.engine, app.state.metrics
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}]}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        start = time.monotonic()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200  # headers come at once; the first event only once decoding starts
            while engine.queued == 0 and time.monotonic() < start + 10:
                time.sleep(0.01)
            assert engine.queued == 1
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 10
        while engine.queued and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(3.2)  # past the batching wait (long: the refusal above must come while it waits, on a busy
        # machine too): the child would have decoded it by now
        assert engine.queued == 0 and metrics.batch_size._sum.get() == 0

        answers = {}
        waiting = threading.Thread(target=lambda: answers.update(r=client.post("/v1/chat/completions", json=body)))
        waiting.start()
        while engine.queued == 0 and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        os.kill(engine.process.pid, signal.SIGKILL)
        waiting.join(30)
        error = answers["r"].json()["error"]
        assert answers["r"].status_code == 503 and error["code"] == "decoder_exited"
        assert "exited unexpectedly" in error["message"] and "-9" in error["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "decoder_exited"
    with pytest.raises(DecoderExited):
        engine.submit(Job(ids=[2], kwargs={}, n=1, max_new_tokens=5, on_event=lambda *a: None))
    engine.stop(timeout=5)


def test_a_model_that_does_not_load_is_a_one_line_error(serve_model, tmp_path):
    """The HTTP side reads the configs and the tokenizer; the child loads the weights: a broken weight file
    is the child's error, told to the parent as one line."""
    folder = tmp_path / "broken"
    shutil.copytree(serve_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InputError) as e:
        load_engine(str(folder), engine="process")
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def quick_child(commands, events, folder, options, log_level):
    """A decoding process that loads nothing. At "stop" it closes its pipe to the parent, then takes a moment
    to exit, as a GPU process's teardown does."""
    events.send(("ready",))
    while commands.recv()[0] != "stop":
        pass
    events.close()
    time.sleep(0.5)


def test_a_clean_stop_is_not_taken_for_a_hang(serve_model, monkeypatch, caplog):
    """Two parent threads wait for the child's exit: stop(), and the events reader once the pipe closes. One
    of them reaps the child; the other must not then read it as still running (stop() logged a hang and
    killed a process already gone) or as gone unexpectedly. Reaping is slowed down here (os.waitpid), so that
    the other thread's wait comes while it lasts."""
    monkeypatch.setattr(process, "child_main", quick_child)
    engine = load_engine(serve_model, engine="process")
    reap = os.waitpid

    def slow_reap(pid, options):
        got = reap(pid, options)
        if pid == engine.process.pid and got[0] == pid:
            time.sleep(0.3)
        return got

    monkeypatch.setattr(os, "waitpid", slow_reap)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="blenderbot_mb.serve.process"):
        engine.stop(timeout=20)
    assert time.monotonic() - start < 10
    assert "did not stop" not in caplog.text and "unexpectedly" not in caplog.text
    assert engine.process.exitcode == 0
    assert engine.failure == "the decoder was stopped"
