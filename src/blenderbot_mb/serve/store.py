"""Where server-side conversations live: one small interface, two implementations.

A conversation is a dict `{"id", "created", "messages"}`; `messages` are chat messages `{"role", "content"}`
in the core conversation format (system messages are persona lines and come first). Ids are 128 random
bits from `secrets`, as 32 hex digits, so they can be neither guessed nor enumerated.

- `SQLiteStore(path)`: an embedded database file, the default. Every write is committed before the
  request is answered, so a restarted server loses nothing.
- `RedisStore(url)`: a Redis server (redis-py), for several server replicas behind a load balancer.

    >>> store = open_store("conversations.sqlite3")          # or "redis://127.0.0.1:6379/0"
    >>> conv = store.create([{"role": "system", "content": "I love cats."}])
    >>> store.append(conv["id"], [{"role": "user", "content": "Hi!"}])
    True
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class StoreUnavailable(Exception):
    """The store cannot be reached or written now (Redis down, a full disk, a locked database): the server
    answers 503 with Retry-After, and the request can be retried, here or on another replica."""


def new_id() -> str:
    return secrets.token_hex(16)  # 128 bits


class ConversationStore(ABC):
    """Create, read, extend and delete conversations. Every method is safe to call from several threads. An
    implementation writes `_create`, `_get`, `_append`, `_delete` and `close`, and names in `outage` its
    errors of an unreachable or failing store, which the public methods raise as StoreUnavailable."""

    outage: tuple = ()

    def create(self, messages: list[dict]) -> dict:
        with _unavailable_on(self.outage):
            return self._create(messages)

    def get(self, conversation_id: str) -> dict | None:
        with _unavailable_on(self.outage):
            return self._get(conversation_id)

    def append(self, conversation_id: str, messages: list[dict]) -> bool:
        """Add messages at the end, all or none; False when the conversation does not exist."""
        with _unavailable_on(self.outage):
            return self._append(conversation_id, messages)

    def delete(self, conversation_id: str) -> bool:
        with _unavailable_on(self.outage):
            return self._delete(conversation_id)

    @abstractmethod
    def _create(self, messages: list[dict]) -> dict: ...

    @abstractmethod
    def _get(self, conversation_id: str) -> dict | None: ...

    @abstractmethod
    def _append(self, conversation_id: str, messages: list[dict]) -> bool: ...

    @abstractmethod
    def _delete(self, conversation_id: str) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...


class SQLiteStore(ConversationStore):
    """Conversations in one SQLite file (write-ahead log, each write committed at once)."""

    outage = (sqlite3.OperationalError,)  # a full disk, a locked or vanished file

    def __init__(self, path: str):
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, created REAL NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE, "
                            "role TEXT NOT NULL, content TEXT NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, seq)")

    def _create(self, messages):
        conv = {"id": new_id(), "created": int(time.time()), "messages": list(messages)}
        with self.lock, self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO conversations VALUES (?, ?)", (conv["id"], conv["created"]))
            self._insert(conv["id"], messages)
        return conv

    def _get(self, conversation_id):
        with self.lock:
            row = self.db.execute("SELECT created FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None:
                return None
            rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY seq",
                                   (conversation_id,)).fetchall()
        return {"id": conversation_id, "created": int(row[0]),
                "messages": [{"role": role, "content": content} for role, content in rows]}

    def _append(self, conversation_id, messages):
        with self.lock, self.db:
            self.db.execute("BEGIN")
            if self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                return False
            self._insert(conversation_id, messages)
        return True

    def _delete(self, conversation_id):
        with self.lock, self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM messages WHERE conversation = ?", (conversation_id,))
            return self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def close(self):
        with self.lock:
            self.db.close()

    def _insert(self, conversation_id, messages):
        self.db.executemany("INSERT INTO messages (conversation, role, content) VALUES (?, ?, ?)",
                            [(conversation_id, m["role"], m["content"]) for m in messages])


# append to the message list only if the conversation exists, in one atomic step on the server
_APPEND_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i, message in ipairs(ARGV) do redis.call('RPUSH', KEYS[2], message) end
return 1
"""


class RedisStore(ConversationStore):
    """Conversations in Redis: `<prefix><id>` holds the creation time, `<prefix><id>:messages` a list of
    JSON messages. Several servers pointed at one Redis see the same conversations."""

    def __init__(self, url: str, prefix: str = "blenderbot-mb:conversation:"):
        from .._backends import require_module

        redis = require_module("redis", "serve", "The Redis conversation store")
        self.outage = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                       redis.exceptions.BusyLoadingError)
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.client.ping()  # fail at start, not at the first request
        self.prefix = prefix
        self._append_script = self.client.register_script(_APPEND_IF_EXISTS)

    def _create(self, messages):
        conv = {"id": new_id(), "created": int(time.time()), "messages": list(messages)}
        key = self.prefix + conv["id"]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, conv["created"])
            if messages:
                pipe.rpush(key + ":messages", *map(json.dumps, messages))
            pipe.execute()
        return conv

    def _get(self, conversation_id):
        key = self.prefix + conversation_id
        with self.client.pipeline(transaction=True) as pipe:
            created, messages = pipe.get(key).lrange(key + ":messages", 0, -1).execute()
        if created is None:
            return None
        return {"id": conversation_id, "created": int(created), "messages": [json.loads(m) for m in messages]}

    def _append(self, conversation_id, messages):
        key = self.prefix + conversation_id
        return bool(self._append_script(keys=[key, key + ":messages"], args=[json.dumps(m) for m in messages]))

    def _delete(self, conversation_id):
        key = self.prefix + conversation_id
        return self.client.delete(key, key + ":messages") > 0

    def close(self):
        self.client.close()


@contextmanager
def _unavailable_on(errors):
    """The store's own errors of an outage as StoreUnavailable, its message kept."""
    try:
        yield
    except errors as e:
        raise StoreUnavailable(f"the conversation store is unavailable: {type(e).__name__}: {e}") from e


def open_store(location: str) -> ConversationStore:
    """`redis://...` / `rediss://...` / `unix://...` -> RedisStore, anything else is an SQLite file path.
    InputError naming the location when it cannot be opened (the server's `--store`)."""
    from ..errors import InputError

    try:
        if location.startswith(("redis://", "rediss://", "unix://")):
            return RedisStore(location)
        return SQLiteStore(location)
    except (OSError, sqlite3.Error, ValueError) as e:
        raise InputError(f"--store {location}: cannot open it: {type(e).__name__}: {e}") from None
    except Exception as e:  # redis-py's errors (ConnectionError, AuthenticationError, ...), when it is installed
        if type(e).__module__.startswith("redis"):
            raise InputError(f"--store {location}: cannot open it: {type(e).__name__}: {e}") from None
        raise


def default_store_path() -> str:
    from ..fileio import cache_home

    return os.path.join(cache_home(), "conversations.sqlite3")
