"""The decoding engine in a process of its own, as text-generation servers split an HTTP router from the model.

The HTTP process keeps the request side (encode, validate, queue, relay): it loads only the tokenizer and
the configs, and no framework. A child process, started with multiprocessing's "spawn" method (a fresh
interpreter: nothing inherited from a framework already initialised here), loads the model and runs
`engine.Engine`'s batching loop. The interpreter lock of one process then no longer stalls the other: the
HTTP side takes in requests while a batch decodes.

Two one-way pipes carry small pickled messages. To the child: ("submit", job fields), ("cancel", number),
("stop",). From the child: ("ready",) or ("failed", line) once, then lists of events, one list per decoding
step and batch: a job's ("delta", number, (choice, text)), ("done", number, Result) and ("error", number,
exception), and the batch's ("started", None, numbers) and ("batch", None, (size, tokens, seconds)). A reader thread here hands each event to its
job's `on_event`, as the in-process engine does. If the child dies, every job waiting on it gets a
`DecoderExited` error, and so does every later request.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import weakref
from collections.abc import Callable

from ..errors import InputError
from .engine import Engine, Job, RequestSide

logger = logging.getLogger(__name__)


class DecoderExited(RuntimeError):
    """The decoding process is gone: the request can not be answered."""


class ProcessEngine(RequestSide):
    """`engine.Engine`'s interface, with the model and the batching loop in a child process.

    `model` is a folder or hub id (None: the default model), `load` the keyword arguments of
    `server.load_bot` other than the model. Waits until the model is loaded; a load error raises InputError
    with the child's one-line reason.
    """

    def __init__(self, model: str | None, load: dict, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, log_level: str = "warning",
                 observe_batch: Callable[[int, int, float], None] | None = None):
        from ..config import BlenderbotConfig
        from ..generation_config import GenerationConfig
        from ..hub import resolve_folder
        from ..tokenizer import BlenderbotTokenizer

        if model is None:
            from ..default_model import default_model_path

            model = default_model_path()
        self.folder = resolve_folder(model)
        self.config = BlenderbotConfig.from_pretrained(self.folder)
        self.tokenizer = BlenderbotTokenizer.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder, self.config)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observe_batch = observe_batch or (lambda size, tokens, seconds: None)
        self.resolved = {}
        self.jobs: dict[int, Job] = {}  # number -> job, until done, failed or cancelled
        self.waiting: set[int] = set()  # numbers not yet in a batch
        self.lock, self.send_lock = threading.Lock(), threading.Lock()
        self.join_lock = threading.Lock()  # one thread at a time waits on the child (see _join)
        self.stopping = False

        context = multiprocessing.get_context("spawn")
        commands, self.commands = context.Pipe(duplex=False)
        self.events, events = context.Pipe(duplex=False)
        options = dict(load, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.process = context.Process(target=child_main, args=(commands, events, self.folder, options, log_level),
                                       name="blenderbot-mb-decoder")
        self.process.start()
        commands.close()  # the child's ends: closed here, so that the child's exit reads as end of file
        events.close()
        try:
            reply = self.events.recv()
        except EOFError:
            reply = ("failed", f"the decoding process exited while loading the model (exit code "
                               f"{self._exit_code()})")
        if reply[0] != "ready":
            self._exit_code()
            raise InputError(reply[1])
        self.reader = threading.Thread(target=self._read, name="blenderbot-mb-decoder-events", daemon=True)
        self.reader.start()

    # ------------------------------------------------------------------ the request side
    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full. Raises DecoderExited once the child is gone."""
        fields = dict(ids=job.ids, kwargs=dict(job.kwargs, seed=job.seed), n=job.n,
                      max_new_tokens=job.max_new_tokens, text_tokens=job.text_tokens, stream=job.stream,
                      rows_per_input=job.rows_per_input,
                      arrived=job.arrived, number=job.number, stops=job.stops,
                      logprobs=job.logprobs)
        with self.lock:
            if self.failure is not None:
                raise DecoderExited(self.failure)
            if len(self.waiting) >= self.max_queue:
                return False
            self.jobs[job.number] = job
            self.waiting.add(job.number)
        if not self._send(("submit", fields)):
            with self.lock:
                self.jobs.pop(job.number, None)
                self.waiting.discard(job.number)
            raise DecoderExited(self.failure or "the decoding process is gone")
        return True

    def cancel(self, job: Job) -> None:
        """The client went away: nothing more reaches it, and the child drops the job (see Engine.cancel)."""
        job.cancelled = True
        with self.lock:
            known = self.jobs.pop(job.number, None) is not None
            self.waiting.discard(job.number)
        if known:
            self._send(("cancel", job.number))

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        """Nothing to do: the child decodes from the moment its model is loaded."""

    def stop(self, timeout: float | None = None) -> None:
        """Let the child finish the queued jobs and exit (killed after `timeout` seconds)."""
        self.stopping = True
        self._send(("stop",))
        if self._join(timeout) is None:
            if timeout:
                logger.warning("the decoding process did not stop in %s s: killing it", timeout)
            with self.join_lock:
                self.process.kill()
                self.process.join()
        self.reader.join(timeout)

    def _send(self, message) -> bool:
        with self.send_lock:
            try:
                self.commands.send(message)
                return True
            except OSError:  # the child is gone; the reader fails its jobs
                return False

    def _join(self, timeout: float | None) -> int | None:
        """Wait up to `timeout` seconds for the child to exit: its exit code, or None while it runs.

        The reader thread waits too, once the child closes its pipe. Two threads must not wait at once:
        both would call waitpid() as the child exits, one would reap it, and the other's would fail and
        read as a child still running (the decoder's stop took it for a hang and killed a process already
        gone)."""
        with self.join_lock:
            self.process.join(timeout)
            return self.process.exitcode

    def _exit_code(self):
        return self._join(10)

    # ------------------------------------------------------------------ the events
    def _read(self) -> None:
        try:
            while True:
                for kind, number, payload in self.events.recv():
                    self._dispatch(kind, number, payload)
        except (EOFError, OSError):
            pass
        code = self._exit_code()
        with self.lock:
            self.failure = ("the decoder was stopped" if self.stopping and code == 0 else
                            f"the decoding process exited unexpectedly (exit code {code}); the server needs a restart")
            jobs = list(self.jobs.values())
            self.jobs.clear()
            self.waiting.clear()
        if not self.stopping or jobs:
            logger.error("%s; failing %d request(s)", self.failure, len(jobs))
        for job in jobs:
            job.on_event("error", DecoderExited(self.failure))

    def _dispatch(self, kind: str, number: int | None, payload) -> None:
        if kind == "batch":
            self.observe_batch(*payload)  # (size, tokens, seconds)
            return
        with self.lock:
            if kind == "started":
                self.waiting.difference_update(payload)
                return
            job = self.jobs.get(number) if kind == "delta" else self.jobs.pop(number, None)
        if job is not None:
            job.on_event(kind, payload)


# ---------------------------------------------------------------------- the child
def child_main(commands, events, folder: str, options: dict, log_level: str) -> None:
    """The decoding process: load the model, then run the batching loop on the jobs the parent sends."""
    from ..cli import _import_tensorflow_quietly, error_line
    from .server import load_bot, log_to_stderr

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (it drains first)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_to_stderr(log_level)
    max_batch, max_wait_ms = options.pop("max_batch"), options.pop("max_wait_ms")
    if options.get("backend") == "tf":
        _import_tensorflow_quietly()  # (the command's filter of TensorFlow's import noise, in this process too)
    try:
        engine = Engine(load_bot(folder, **options), max_batch=max_batch, max_wait_ms=max_wait_ms,
                        max_queue=sys.maxsize)  # the parent bounds the queue
    except BaseException as e:  # noqa: BLE001 - told to the parent, which reports it as the CLI's error line
        events.send(("failed", error_line(e)))
        return
    outbox = []  # the events of the current step, filled and sent by the decoder thread only

    def flush():
        if outbox:
            try:
                events.send(outbox)
            except OSError:  # the parent is gone; the loop below ends too
                pass
            outbox.clear()

    def reporter(number: int):
        def on_event(kind, payload):
            outbox.append((kind, number, portable(payload) if kind == "error" else payload))
        return on_event

    engine.observe_batch = lambda size, tokens, seconds: outbox.append(("batch", None, (size, tokens, seconds)))
    engine.on_batch = lambda jobs: outbox.append(("started", None, [job.number for job in jobs]))
    engine.flush = flush
    live: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()  # jobs the engine still holds
    events.send(("ready",))
    engine.start()
    try:
        while (message := commands.recv())[0] != "stop":
            if message[0] == "submit":
                fields = message[1]
                job = Job(**fields, on_event=reporter(fields["number"]))
                live[job.number] = job
                engine.submit(job)
            elif (job := live.get(message[1])) is not None:  # ("cancel", number)
                engine.cancel(job)
    except EOFError:  # the parent is gone
        pass
    engine.stop()


def portable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its type and message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(error).__name__}: {error}")
