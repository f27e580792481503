"""The HTTP application (FastAPI): OpenAI-style chat completions, server-side conversations, health,
Prometheus metrics and the chat page. `create_app(engine, store, model_name)` builds it; `server.serve`
runs it under uvicorn.

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
for anything the client can fix; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import BlenderbotError, ConfigError, InputError
from .engine import Engine, Job, Result
from .metrics import Metrics
from .process import DecoderExited, ProcessEngine
from .schemas import NEUTRAL, ChatCompletionRequest, ConversationMessage, GenerationParams, NewConversation
from .store import ID_PATTERN, ConversationStore, StoreUnavailable

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


class StopScan:
    """One reply's text cut before the first of the client's stop strings (OpenAI's `stop`), whole or as it
    streams: `feed` returns what can be shown now, holding back an end that may begin a stop string; `finish`
    returns what was held back. The pieces add up to the whole text cut at its first stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self.held + text
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        held, self.held = ("" if self.stopped else self.held), ""
        return held


def cut_at_stops(result: Result, stops: list[str]) -> Result:
    """`result` with each text cut before its first stop string, and that choice's finish reason "stop"; its
    log-probabilities, if any, keep the tokens whose text starts before the cut."""
    if not stops:
        return result
    texts, reasons = [], []
    for text, reason in zip(result.texts, result.finish_reasons, strict=True):
        scan = StopScan(stops)
        texts.append(scan.feed(text) + scan.finish())
        reasons.append("stop" if scan.stopped else reason)
    logprobs = result.logprobs
    if logprobs is not None:
        logprobs = [[entry for entry, start in zip(entries, offsets, strict=True) if start < len(text)]
                    for entries, offsets, text in zip(logprobs, result.logprob_offsets, texts, strict=True)]
    return dataclasses.replace(result, texts=texts, finish_reasons=reasons, logprobs=logprobs)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _type_tag(part) -> bool:
    """A part of a pydantic error location that names a type of a union ("str", "constrained-str",
    "list[str]", "function-after[...]"), not a field."""
    return isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool", "list",
                                                                            "dict", "none"))


# generate()'s names of the settings a request sets, as the request names them
REQUEST_FIELDS = {"num_return_sequences": "n", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                  "max_length": "max_tokens", "min_length": "min_tokens", "do_sample": "temperature"}


def setting_error(e: ConfigError) -> APIError:
    """A generation setting the request made invalid, as a 400 naming the request's field (`param`), without
    the server-side advice on raising a limit."""
    message = " ".join(str(e).split()).split("; to raise it, set")[0]
    names = re.findall(r"'([a-z_]+)'", message) + re.findall(r"\b(max_length|min_length)\b", message)
    param = next((REQUEST_FIELDS.get(n, n) for n in names), None)
    return APIError(400, message, "invalid_value", param)


def error_response(status: int, message: str, code: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine | ProcessEngine, store: ConversationStore, model_name: str,
               max_body_bytes: int = MAX_BODY_BYTES, allow_origins: tuple[str, ...] = ()) -> FastAPI:
    """The app; `allow_origins`: web origins whose pages may call the API from a browser (CORS; none by
    default: only the server's own page and non-browser clients)."""
    metrics = Metrics()
    engine.observe_batch = metrics.observe_batch
    metrics.queued.set_function(lambda: engine.queued)

    async def lifespan(app):
        engine.start()
        yield

    app = FastAPI(title="blenderbot-mb", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.store, app.state.metrics = engine, store, metrics
    app.state.draining = False
    app.state.in_flight = 0
    jobs: set[Job] = set()  # the jobs whose requests wait for them (cut_all answers them)

    def cut_all() -> int:
        """Answer every waiting request 503 now (a second signal ends the drain): a JSON error, or an error
        event for a stream, rather than a connection cut mid-request. The number cut."""
        error = APIError(503, "the server is stopping: this request was cut before its reply; retry later",
                         "shutting_down", headers={"Retry-After": "1"})
        waiting = list(jobs)
        for job in waiting:
            job.on_event("error", error)
        return len(waiting)

    app.state.cut_all = cut_all
    app.add_middleware(Gate, max_body_bytes=max_body_bytes)
    if allow_origins:  # outside the gate: a browser's preflight is answered before anything else
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"])

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.code, e.param, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = max(errors, key=lambda x: len(x.get("loc", ())))  # in a union, the member that got furthest
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p))
        if first.get("type") == "missing" and not where:
            return error_response(400, "the request needs a JSON body: an object with its fields", "invalid_value")
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                                  "invalid_json")
        if first.get("type") == "extra_forbidden" and where in NEUTRAL:
            accepted = " or ".join(json.dumps(v) for v in NEUTRAL[where])
            return error_response(400, f"unsupported field {where!r}: this server takes only {accepted} (asks for "
                                  "nothing) or null", "unsupported_field", where)
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown or unsupported field {where!r}", "unsupported_field", where)
        text = first["msg"].removeprefix("Value error, ")
        message = f"{where}: {text}" if where else text
        return error_response(400, message, "invalid_value", where or None)

    @app.exception_handler(ClientLeft)
    async def _client_left(request, e: ClientLeft):  # nobody reads it: nginx's code for the log and metrics
        return error_response(499, "the client closed the request before its reply", "client_closed_request")

    @app.exception_handler(DecoderExited)
    async def _decoder_exited(request, e: DecoderExited):
        return error_response(503, str(e), "decoder_exited")

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request, e: StoreUnavailable):
        logger.warning("%s %s: %s", request.method, request.url.path, e)
        return error_response(503, f"{e}; retry later", "store_unavailable", headers={"Retry-After": "1"})

    @app.exception_handler(BlenderbotError)
    async def _bad_input(request, e: BlenderbotError):
        return error_response(400, " ".join(str(e).split()), "invalid_value")

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # anything else is a bug: its traceback in the log, a JSON 500
        logger.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 400 and "error parsing the body" in str(e.detail):  # not UTF-8, among others
            return error_response(400, "malformed JSON body: it must be UTF-8 encoded JSON, its integers of at most "
                                  "4300 digits", "invalid_json")
        return error_response(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "http_error",
                              headers=getattr(e, "headers", None))

    # ------------------------------------------------------------------ health, metrics, page
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if engine.failure is not None:
            return JSONResponse({"status": "unhealthy", "error": engine.failure}, status_code=503)
        return {"status": "ok", "model": model_name, "queued": engine.queued}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    static = resources.files(__package__) / "static"

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static")

    started = int(time.time())

    def model_card() -> dict:  # ("created": when this server started serving it)
        return {"id": model_name, "object": "model", "created": started, "owned_by": "blenderbot-mb"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} is not served here; this server serves {model_name!r}",
                           "model_not_found", "model")
        return model_card()

    # ------------------------------------------------------------------ decoding
    def submit(messages: list[dict], params: GenerationParams, n: int, stream: bool,
               logprobs: int | None = None) -> tuple[Job, asyncio.Queue]:
        """Encode and validate (400 on anything wrong), then queue (503 when full): the job and its events."""
        try:
            ids = engine.encode(messages)
        except InputError as e:  # the conversation's own rules (persona lines first): the messages' fault
            raise APIError(400, " ".join(str(e).split()), "invalid_value", "messages") from None
        kwargs = params.generation_kwargs(n)
        check_lengths_and_choices(params, kwargs, n)
        text_tokens = kwargs.get("max_new_tokens")
        if text_tokens is not None and engine.generation_config.forced_eos_token_id is not None and \
                text_tokens < engine.config.max_position_embeddings - 1:
            # max_tokens counts the reply's text, as OpenAI's: one more step for the EOS the model forces at the end
            kwargs["max_new_tokens"] = text_tokens + 1
        try:
            resolved = engine.resolve(kwargs)
        except ConfigError as e:
            raise setting_error(e) from None
        events, on_event = event_queue()
        job = Job(ids=ids, kwargs=kwargs, n=n, max_new_tokens=resolved.max_length - 1, text_tokens=text_tokens,
                  on_event=on_event, stream=stream, rows_per_input=1 if resolved.num_beams > 1 else n,
                  stops=tuple(params.stops()), logprobs=logprobs)
        if not engine.submit(job):
            raise APIError(503, "the server is at capacity; retry later", "overloaded", headers={"Retry-After": "1"})
        jobs.add(job)
        return job, events

    def check_lengths_and_choices(params: GenerationParams, kwargs: dict, n: int) -> None:
        """The request's own bounds, in its own words, before generate()'s rules: reply lengths within the
        model's positions, n choices only from sampling or enough beams."""
        limit = engine.config.max_position_embeddings - 1  # one position for the start token
        name = "max_completion_tokens" if params.max_completion_tokens is not None else "max_tokens"
        most = kwargs.get("max_new_tokens")
        if most is not None and most > limit:
            raise APIError(400, f"{name}: at most {limit} for this model ({limit + 1} positions, one of them the "
                           "start token's)", "invalid_value", name)
        least = params.min_tokens
        if least is not None and least > (limit if most is None else most):
            raise APIError(400, f"min_tokens: at most {name} ({most})" if most is not None else
                           f"min_tokens: at most {limit} for this model", "invalid_value", "min_tokens")
        outside = [k for k in params.logit_bias or () if int(k) >= engine.config.vocab_size]
        if outside:
            raise APIError(400, f"logit_bias: token id {outside[0]} is not in the model's vocabulary (ids 0 to "
                           f"{engine.config.vocab_size - 1})", "invalid_value", "logit_bias")
        beams = kwargs.get("num_beams", engine.generation_config.num_beams)
        sampling = kwargs.get("do_sample", engine.generation_config.do_sample)
        if n > 1 and beams == 1 and not sampling:
            raise APIError(400, f"n: {n} choices need sampling (temperature > 0) or beam search with num_beams >= n",
                           "invalid_value", "n")
        if n > beams > 1:
            raise APIError(400, f"n: at most num_beams ({beams}) choices from beam search", "invalid_value", "n")

    async def run(job: Job, events: asyncio.Queue):
        """The job's events until it is done; a client that leaves cancels it."""
        finished = False
        try:
            while True:
                kind, payload = await events.get()
                if kind == "error" and isinstance(payload, DecoderExited):
                    raise APIError(503, str(payload), "decoder_exited")
                if kind == "error" and isinstance(payload, APIError):
                    raise payload
                if kind == "error":
                    raise payload if isinstance(payload, BlenderbotError) else APIError(
                        500, f"generation failed: {type(payload).__name__}: {payload} (traceback in the server log)",
                        "generation_failed")
                finished = kind == "done"
                yield kind, payload
                if finished:
                    return
        finally:
            jobs.discard(job)
            if not finished:
                engine.cancel(job)

    def event_queue():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, payload):  # called by the decoder thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        return events, on_event

    async def complete(job, events, request: Request) -> Result:
        """The job's result; a client that leaves before it cancels the job (ClientLeft), as a streaming one
        does."""
        async def result():
            async for kind, payload in run(job, events):
                if kind == "done":
                    return payload
            raise AssertionError("unreachable")

        async def until_disconnect():  # (the body is read: the next ASGI message is the disconnect)
            while (await request.receive())["type"] != "http.disconnect":
                pass

        decoding, watch = asyncio.ensure_future(result()), asyncio.ensure_future(until_disconnect())
        try:
            await asyncio.wait({decoding, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not decoding.done():  # the client left (or this handler was cancelled): run() cancels the job
                decoding.cancel()
        if not decoding.cancelled() and decoding.done():
            return decoding.result()
        with contextlib.suppress(asyncio.CancelledError):
            await decoding  # (its cancel has run: the job left the queue)
        raise ClientLeft()

    def usage(result: Result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def sse(data) -> str:
        return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"

    async def stream_chunks(job, events, head: dict, n: int, include_usage: bool, after=None, stops=()):
        """OpenAI `chat.completion.chunk` events: the role, text deltas (cut at the first stop string), the
        log-probabilities where asked for (each choice's in one chunk after its text: they are computed over the
        whole reply, `Engine._add_logprobs`; clients that gather a choice's chunks get them all), the finish
        reasons, [DONE]."""
        def chunk(choices, **extra):
            return sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        scans = [StopScan(list(stops)) for _ in range(n)]
        try:
            for c in range(n):
                yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for kind, payload in run(job, events):
                if kind == "delta":
                    c, text = payload
                    text = scans[c].feed(text)
                    if text:
                        yield chunk([{"index": c, "delta": {"content": text}, "finish_reason": None}])
                    continue
                for c, scan in enumerate(scans):
                    if text := scan.finish():
                        yield chunk([{"index": c, "delta": {"content": text}, "finish_reason": None}])
                payload = cut_at_stops(payload, list(stops))
                if after is not None:
                    await after(payload)
                for c, entries in enumerate(payload.logprobs or ()):
                    yield chunk([{"index": c, "delta": {}, "logprobs": {"content": entries, "refusal": None},
                                  "finish_reason": None}])
                for c in range(n):
                    yield chunk([{"index": c, "delta": {}, "finish_reason": payload.finish_reasons[c]}])
                if include_usage:
                    yield chunk([], usage=usage(payload))
        except APIError as e:
            yield sse({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}})
        except BlenderbotError as e:
            yield sse({"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                 "code": "invalid_value"}})
        except Exception as e:  # noqa: BLE001 - a bug: its traceback in the log, an error event to the client
            logger.exception("a streamed reply failed")
            yield sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                 "param": None, "code": "internal_error"}})
        yield sse("[DONE]")

    def streaming(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ OpenAI chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} is not served here; this server serves {model_name!r} "
                           "(GET /v1/models)", "model_not_found", "model")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only with stream: true", "invalid_value", "stream_options")
        messages = [{"role": m.conversation_role(), "content": m.text()} for m in body.messages]
        job, events = submit(messages, body, body.n, body.stream, body.logprobs_wanted())
        head = {"id": "chatcmpl-" + job_id(), "created": int(time.time()), "model": model_name}
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return streaming(stream_chunks(job, events, head, body.n, include, stops=body.stops()))
        result = cut_at_stops(await complete(job, events, request), body.stops())
        logprobs = result.logprobs or [None] * len(result.texts)
        choices = [{"index": c, "message": {"role": "assistant", "content": text},
                    "logprobs": None if entries is None else {"content": entries, "refusal": None},
                    "finish_reason": reason}
                   for c, (text, reason, entries) in enumerate(zip(result.texts, result.finish_reasons, logprobs,
                                                                   strict=True))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(result)}

    # ------------------------------------------------------------------ server-side conversations
    async def load(conversation_id: str) -> dict:
        conv = await run_in_threadpool(store.get, conversation_id) if ID_PATTERN.match(conversation_id) else None
        if conv is None:
            raise APIError(404, f"no conversation {conversation_id!r}", "conversation_not_found", "conversation_id")
        return conv

    @app.post("/v1/conversations", status_code=201)
    async def create_conversation(body: NewConversation | None = None):
        persona = [{"role": "system", "content": p} for p in (body.persona if body else [])]
        return await run_in_threadpool(store.create, persona)

    @app.get("/v1/conversations/{conversation_id}")
    async def read_conversation(conversation_id: str):
        return await load(conversation_id)

    @app.delete("/v1/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(conversation_id: str):
        if not (ID_PATTERN.match(conversation_id) and await run_in_threadpool(store.delete, conversation_id)):
            raise APIError(404, f"no conversation {conversation_id!r}", "conversation_not_found", "conversation_id")
        return Response(status_code=204)

    @app.post("/v1/conversations/{conversation_id}/messages")
    async def add_message(conversation_id: str, body: ConversationMessage, request: Request):
        """Add a user message and get the reply; both join the history once the reply is complete."""
        conv = await load(conversation_id)
        user = {"role": "user", "content": body.content}
        job, events = submit([*conv["messages"], user], body, 1, body.stream)

        async def save(result: Result):
            reply = {"role": "assistant", "content": result.texts[0]}
            if not await run_in_threadpool(store.append, conversation_id, [user, reply]):
                raise APIError(404, f"conversation {conversation_id!r} was deleted meanwhile",
                               "conversation_not_found", "conversation_id")
            return reply

        head = {"id": "chatcmpl-" + job_id(), "created": int(time.time()), "model": model_name,
                "conversation_id": conversation_id}
        if body.stream:
            return streaming(stream_chunks(job, events, head, 1, True, after=save, stops=body.stops()))
        result = cut_at_stops(await complete(job, events, request), body.stops())
        reply = await save(result)
        return {**head, "message": reply, "finish_reason": result.finish_reasons[0], "usage": usage(result)}

    return app


class ClientLeft(Exception):
    """A client left before its (non-streaming) reply; its job was cancelled."""


def job_id() -> str:
    import secrets

    return secrets.token_hex(12)


ENDPOINTS = ("/v1/chat/completions", "/v1/conversations", "/v1/models", "/health", "/metrics", "/static")


def endpoint_label(path: str) -> str:
    """A bounded metrics label: the endpoint family, never a conversation id."""
    if path == "/":
        return "/"
    return next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")


def request_id(headers: dict) -> bytes:
    """The request's X-Request-Id as the client sent it (printable, at most 128 characters), else a new one."""
    given = headers.get(b"x-request-id", b"")
    if 0 < len(given) <= 128 and all(33 <= c < 127 for c in given):
        return given
    return job_id().encode()


class Gate:
    """ASGI middleware around every HTTP request: 503 while draining, 413 for oversized bodies, 415 for a body
    that is not JSON, the request count, latency and in-flight metrics, and an X-Request-Id on every answer
    (the client's, or a new one) to find the request in logs."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, label = scope["app"].state, endpoint_label(scope["path"])
        metrics: Metrics = state.metrics
        rid = request_id(dict(scope["headers"]))

        async def send_with_id(message, send=send):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        send = send_with_id
        if state.draining and label not in ("/health", "/metrics"):
            response = error_response(503, "the server is shutting down; retry on another replica",
                                      "shutting_down", headers={"Connection": "close", "Retry-After": "1"})
            await response(scope, receive, send)
            metrics.requests.labels(label, "503").inc()
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(scope, receive, send, metrics, label)
            return

        body, more = b"", True  # read the whole (bounded) body first, then hand it to the app
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, receive, send, metrics, label)
                return
        kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and kind and not (kind == b"application/json" or kind.endswith(b"+json")):
            response = error_response(415, f"the body must be JSON sent as Content-Type: application/json, not "
                                      f"{kind.decode('latin-1')[:100]}", "unsupported_media_type")
            await response(scope, receive, send)
            metrics.requests.labels(label, "415").inc()
            return
        if body and not kind:  # a body sent with no type at all (requests' data=...) is read as the JSON it is
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        replayed, status, started = False, "500", time.perf_counter()

        async def replay_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        counts = label not in ("/health", "/metrics")
        if counts:
            state.in_flight += 1
            metrics.in_flight.inc()
        try:
            await self.app(scope, replay_receive, observed_send)
        finally:
            if counts:
                state.in_flight -= 1
                metrics.in_flight.dec()
        metrics.requests.labels(label, status).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def _too_large(self, scope, receive, send, metrics, label):
        response = error_response(413, f"request body larger than {self.max_body_bytes} bytes", "body_too_large")
        await response(scope, receive, send)
        metrics.requests.labels(label, "413").inc()
