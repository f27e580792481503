"""Conversation stores: one contract for SQLite and Redis, a restart that loses nothing, and two server
replicas sharing one Redis (Debian's redis-server, started here on a free localhost port)."""

from __future__ import annotations

import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve import MODEL, free_port, make_app, oracle, require_program, serve_model  # noqa: E402,F401

from blenderbot_mb.serve import RedisStore, SQLiteStore, create_app  # noqa: E402


def start_redis(port: int, folder) -> subprocess.Popen:
    """Debian's redis-server on a localhost port, once it answers."""
    program = require_program("redis-server")
    server = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            RedisStore(f"redis://127.0.0.1:{port}/0").close()
            return server
        except Exception:
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    pytest.importorskip("redis")
    port = free_port()
    server = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteStore(str(tmp_path / "conversations.sqlite3"))
    else:
        store = RedisStore(request.getfixturevalue("redis_url"))
    yield store
    store.close()


def test_store_contract(store):
    persona = [{"role": "system", "content": "I love cats."}]
    a, b = store.create(persona), store.create([])
    assert a["id"] != b["id"] and len(a["id"]) == 32 and int(a["id"], 16) >= 0
    assert store.get(a["id"]) == a and store.get(b["id"])["messages"] == []
    turn = [{"role": "user", "content": "Hi! ünïcode ✓"}, {"role": "assistant", "content": " Hello."}]
    assert store.append(a["id"], turn)
    assert store.get(a["id"])["messages"] == persona + turn
    assert store.get(b["id"])["messages"] == []  # nothing leaked into the other one
    assert store.delete(a["id"]) and store.get(a["id"]) is None
    assert not store.delete(a["id"]) and not store.append(a["id"], turn)
    assert store.get("0" * 32) is None


def test_sqlite_restart_loses_nothing(serve_model, oracle, tmp_path):
    path = str(tmp_path / "conversations.sqlite3")
    app = make_app(serve_model, SQLiteStore(path))
    with TestClient(app) as client:
        conv = client.post("/v1/conversations", json={"persona": ["I love cats."]}).json()
        first = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "Hi!"}).json()["message"]
    app.state.store.close()
    # a new server process on the same file: a new store and app (the model is reused to save time)
    restarted = create_app(app.state.engine, SQLiteStore(path), MODEL)
    with TestClient(restarted) as client:
        history = client.get(f"/v1/conversations/{conv['id']}").json()["messages"]
        assert history == [{"role": "system", "content": "I love cats."}, {"role": "user", "content": "Hi!"}, first]
        r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "Do you have any pets?"})
        assert r.json()["message"]["content"] == oracle([*history, {"role": "user", "content": "Do you have any pets?"}])
    app.state.engine.stop()
    restarted.state.store.close()


def test_two_replicas_share_one_redis(serve_model, oracle, redis_url):
    replicas = [make_app(serve_model, RedisStore(redis_url)) for _ in range(2)]
    with TestClient(replicas[0]) as a, TestClient(replicas[1]) as b:
        conv = a.post("/v1/conversations", json={"persona": ["I live in Paris."]}).json()
        history = [{"role": "system", "content": "I live in Paris."}]
        for client, text in ((b, "Hi!"), (a, "Where do you live?"), (b, "Do you have any pets?")):
            history.append({"role": "user", "content": text})
            r = client.post(f"/v1/conversations/{conv['id']}/messages", json={"content": text})
            assert r.status_code == 200, r.text
            assert r.json()["message"]["content"] == oracle(history)
            history.append(r.json()["message"])
        assert a.get(f"/v1/conversations/{conv['id']}").json()["messages"] == history
        assert b.delete(f"/v1/conversations/{conv['id']}").status_code == 204
        assert a.get(f"/v1/conversations/{conv['id']}").status_code == 404
    for app in replicas:
        app.state.engine.stop()
        app.state.store.close()


def test_a_store_outage_is_503_and_the_server_recovers(serve_model, tmp_path):
    """Redis going away: the conversation endpoints answer 503 store_unavailable with Retry-After (not a 500
    with a traceback), the chat completions go on, and the store works again once Redis is back. A --store that
    cannot be opened is an InputError naming it."""
    pytest.importorskip("redis")
    from blenderbot_mb.errors import InputError
    from blenderbot_mb.serve.store import open_store

    port = free_port()
    redis = start_redis(port, tmp_path)
    app = make_app(serve_model, RedisStore(f"redis://127.0.0.1:{port}/0"))
    try:
        with TestClient(app) as client:
            conversation = client.post("/v1/conversations", json={}).json()["id"]
            redis.terminate()
            redis.wait(10)
            for r in (client.post("/v1/conversations", json={}), client.get(f"/v1/conversations/{conversation}"),
                      client.post(f"/v1/conversations/{conversation}/messages", json={"content": "Hi!"})):
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["code"] == "store_unavailable"
            chat = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                             "messages": [{"role": "user", "content": "Hi!"}]})
            assert chat.status_code == 200
            redis = start_redis(port, tmp_path)  # (an empty Redis: the conversation is gone, the store is back)
            assert client.post("/v1/conversations", json={}).status_code == 201
            assert client.get(f"/v1/conversations/{conversation}").status_code == 404
    finally:
        app.state.engine.stop()
        redis.terminate()
        redis.wait(10)
    for location, words in ((f"redis://127.0.0.1:{port}/0", "ConnectionError"), (str(tmp_path), "OperationalError")):
        with pytest.raises(InputError, match=f"--store {location}: cannot open it: {words}"):
            open_store(location)
