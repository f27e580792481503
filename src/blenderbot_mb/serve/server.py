"""Run the app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal the server stops taking work: new requests get 503 (and `/health` too, so a load
balancer takes the replica out), the requests in flight finish, then uvicorn closes. A second signal ends it
at once (the requests in flight are answered 503, queued ones dropped), as does `drain_timeout` seconds of
draining.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings

import uvicorn

from .app import MAX_BODY_BYTES, create_app
from .engine import Engine
from .process import DecoderExited, ProcessEngine
from .store import default_store_path, open_store

logger = logging.getLogger(__name__)
ENGINES = ("process", "thread")
DTYPES = ("float32", "bfloat16", "float16")


def check_options(backend: str = "torch", dtype: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
                  max_queue: int = 1024, threads: int | None = None, quantize: str | None = None,
                  engine: str = "thread", kernels: bool = False) -> None:
    """The server options that need no model, checked before anything loads."""
    from ..errors import InputError

    if kernels and (backend != "torch" or quantize is not None):
        refused = [f"--backend {backend}"] * (backend != "torch") + [f"--quantize {quantize}"] * (quantize is not None)
        raise InputError("--kernels runs the torch backend's Triton kernels on NVIDIA GPUs: not with "
                         + " or ".join(refused))
    if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
        raise InputError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0")
    if quantize is not None and dtype not in (None, "float32"):
        raise InputError(f"--quantize {quantize} starts from float32 weights: leave out --dtype {dtype}")
    if threads is not None and (backend != "torch" or threads < 1):
        raise InputError("--threads takes a count >= 1, with the torch backend")
    if dtype not in (None, *DTYPES):
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype not in (None, "float32") and backend != "torch":
        raise InputError(f"--dtype {dtype} is supported with the torch backend only")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")


def load_bot(model: str | None = None, backend: str = "torch", device: str | None = None, dtype: str | None = None,
             threads: int | None = None, quantize: str | None = None, kernels: bool = False):
    """The model, on its device and in its dtype, with its tokenizer (`blenderbot_mb.cli.Bot`); `kernels`: its
    decoder step written with Triton kernels (`cli.use_kernels`)."""
    from ..cli import Bot, use_kernels

    bot = Bot(model, backend, device, quantize)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if dtype not in (None, "float32"):
        import torch

        bot.model.to(getattr(torch, dtype))
        bot.model.pack_decoding(False)  # the packed step is a float32 path (Bot picks it for float32 on the CPU)
    if kernels:
        use_kernels(bot)
    return bot


def load_engine(model: str | None = None, backend: str = "torch", device: str | None = None,
                dtype: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
                max_queue: int = 1024, threads: int | None = None, quantize: str | None = None,
                engine: str = "thread", log_level: str = "warning", kernels: bool = False) -> Engine | ProcessEngine:
    """The decoding engine: "thread" decodes in a thread of this process, "process" in a process of its own
    (`serve.process`), which waits until the model is loaded there, or raises its load error."""
    check_options(backend, dtype, max_batch, max_wait_ms, max_queue, threads, quantize, engine, kernels)
    load = dict(backend=backend, device=device, dtype=dtype, threads=threads, quantize=quantize, kernels=kernels)
    if engine == "process":
        return ProcessEngine(model, load, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             log_level=log_level)
    return Engine(load_bot(model, **load), max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)


def log_to_stderr(level: str) -> None:
    """The package's log records (a failed generate()'s traceback among them) on stderr beside uvicorn's; the
    warning of a max_tokens below the model's min_length is not repeated for each such request (the maximum
    wins, as documented)."""
    warnings.filterwarnings("ignore", message="Unfeasible length constraints", category=UserWarning)
    package = logging.getLogger("blenderbot_mb")
    for handler in [h for h in package.handlers if getattr(h, "one_line", False)]:
        package.removeHandler(handler)  # the command line's `warning:` lines: a server logs whole records
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(getattr(logging, level.upper(), logging.DEBUG))  # uvicorn's "trace": everything
    logging.getLogger("blenderbot_mb.conversation").setLevel(logging.ERROR)  # cut histories are routine here


def served_name(model: str | None, engine: Engine | ProcessEngine) -> str:
    return model if model is not None else os.path.basename(os.path.normpath(engine.folder))


def check_address(host: str, port: int) -> None:
    """InputError unless this process can listen on host:port now: checked before the model loads, so that a
    port in use (or a host of another machine) is one error line at once, not a failure after the load."""
    from ..errors import InputError

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        raise InputError(f"cannot listen on {host}:{port}: {reason[:1].lower() + reason[1:]}") from None


class DrainingServer(uvicorn.Server):
    def __init__(self, config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.forced = False  # a second signal ended the drain

    def handle_exit(self, sig, frame):
        state = self.config.app.state
        if state.draining:  # a second signal: stop now, without waiting for the replies in flight
            if self.forced:
                return
            self.forced = True
            logger.warning("stopping now: %d request(s) in flight are cut", state.in_flight)
            state.cut_all()  # each gets a JSON 503 (or a stream's error event), not a cut connection

            def exit_once_answered():  # (a moment for those answers to be written, no more)
                deadline = time.monotonic() + 1.0
                while state.in_flight > 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.should_exit = self.force_exit = True

            threading.Thread(target=exit_once_answered, daemon=True).start()
            return  # (not uvicorn's handler, which raises the signal again once the server has closed)
        state.draining = True
        logger.info("draining: %d request(s) in flight", state.in_flight)

        def wait_then_exit():
            deadline = time.monotonic() + self.drain_timeout
            while state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.in_flight > 0:  # the drain timed out: what still waits is answered 503, as on a second signal
                logger.warning("drain timeout: %d request(s) in flight are cut", state.in_flight)
                state.cut_all()
                answered = time.monotonic() + 1.0
                while state.in_flight > 0 and time.monotonic() < answered:
                    time.sleep(0.02)
            self.should_exit = True  # a drained exit is a clean one: exit code 0

        threading.Thread(target=wait_then_exit, daemon=True).start()


def serve(model: str | None = None, backend: str = "torch", device: str | None = None, dtype: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, max_wait_ms: float = 5.0,
          max_queue: int = 1024, store: str | None = None, served_model_name: str | None = None,
          threads: int | None = None, quantize: str | None = None, engine: str = "process",
          max_body_bytes: int = MAX_BODY_BYTES, drain_timeout: float = 30.0, log_level: str = "info",
          kernels: bool = False, allow_origins: tuple[str, ...] = ()) -> None:
    """Load the model, open the conversation store, and serve until SIGTERM/SIGINT. Raises DecoderExited at
    the end if the decoding process had died (the command's exit code then says so)."""
    check_log_level(log_level)
    check_address(host, port)
    log_to_stderr(log_level)
    conversations = open_store(store or default_store_path())  # (before the model: a wrong --store fails at once)
    try:
        decoder = load_engine(model, backend, device, dtype, max_batch=max_batch, max_wait_ms=max_wait_ms,
                              max_queue=max_queue, threads=threads, quantize=quantize, engine=engine,
                              log_level=log_level, kernels=kernels)
    except BaseException:
        conversations.close()
        raise
    server, died = None, None
    try:
        app = create_app(decoder, conversations, served_model_name or served_name(model, decoder),
                         max_body_bytes=max_body_bytes, allow_origins=tuple(allow_origins))
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        server = DrainingServer(config, drain_timeout)
        server.run()
    finally:  # whatever ends the server, the decoding process goes with it (the command never hangs on it)
        died = decoder.failure  # the decoding process died while serving (not by the stop below)
        decoder.stop(timeout=0 if server is None or server.forced else drain_timeout)
        conversations.close()
    if died is not None:
        raise DecoderExited(died)


def check_log_level(level: str) -> None:
    """InputError unless `level` is one of uvicorn's log levels (checked before anything starts)."""
    from ..errors import InputError

    if level not in uvicorn.config.LOG_LEVELS:
        raise InputError(f"--log-level must be one of {', '.join(uvicorn.config.LOG_LEVELS)}, not {level!r}")
