"""`blenderbot-mb serve`: an HTTP chat server with dynamic batching, streaming, conversations and a web page.

Needs the `serve` extra (`pip install 'blenderbot-mb[serve]'`). See docs/serve.md.

    >>> from blenderbot_mb.serve import serve
    >>> serve(port=8000)                              # the default model on 127.0.0.1:8000  # doctest: +SKIP
"""

from __future__ import annotations

from .._backends import require_module

for _module in ("fastapi", "uvicorn", "prometheus_client"):
    require_module(_module, "serve", "blenderbot-mb serve")

from .app import create_app  # noqa: E402
from .engine import Engine  # noqa: E402
from .server import serve  # noqa: E402
from .store import ConversationStore, RedisStore, SQLiteStore, open_store  # noqa: E402

__all__ = ["ConversationStore", "Engine", "RedisStore", "SQLiteStore", "create_app", "open_store", "serve"]
