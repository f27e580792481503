"""The `blenderbot-mb` command: convert checkpoints, get replies, chat, inspect models.

    blenderbot-mb generate "Hello! How are you today?"
    printf 'Hi!\\nDo you have any pets?\\n' | blenderbot-mb chat
    blenderbot-mb convert path/to/model out/ --to flax
    blenderbot-mb info facebook/blenderbot-400M-distill
    blenderbot-mb serve --port 8000
    blenderbot-mb train --data dialogues.jsonl --out run/ --model facebook/blenderbot-400M-distill

Without `--model`, `generate`, `chat` and `serve` use the default model that ships inside the package (see
`blenderbot_mb.default_model`). Every error prints as one line on stderr and exits with code 2 (set
BLENDERBOT_MB_DEBUG=1 to see the traceback of an error that is not one of the package's own).
Importing this module imports no framework: a backend loads only when a command needs it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from enum import Enum
from typing import Annotated, Optional

import typer

from .cli_training import Backend
from .cli_training import register as _register_training
from .errors import BlenderbotError, InputError
from .validation import LIMITS_ENV, check_text, limit

DEBUG_ENV = "BLENDERBOT_MB_DEBUG"

app = typer.Typer(
    name="blenderbot-mb", help="BlenderBot in PyTorch, TensorFlow and Flax: replies, chat, checkpoint conversion.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    # click's plain help: rich's tables cut long option names at 80 columns and show flags as `<bool>`
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"blenderbot-mb {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """BlenderBot in PyTorch, TensorFlow and Flax: replies, chat, checkpoint conversion."""


class Format(str, Enum):
    safetensors = "safetensors"
    pt = "pt"
    tf = "tf"
    flax = "flax"
    onnx = "onnx"
    savedmodel = "savedmodel"
    ctranslate2 = "ctranslate2"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Quantization(str, Enum):
    int8 = "int8"


class ServeEngine(str, Enum):
    process = "process"
    thread = "thread"


def one_line(error: BaseException | str, width: int = 1000) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def error_line(error: BaseException) -> str:
    """What the user reads: our errors as they are, system errors by their reason and file, others by type."""
    if isinstance(error, BlenderbotError):
        return one_line(error)
    if isinstance(error, OSError) and error.strerror:
        return one_line(f"{error.strerror}: {error.filename}" if error.filename else error.strerror)
    if isinstance(error, MemoryError):
        return "out of memory"
    text = str(error)
    if type(error).__module__.startswith("tensorflow"):
        text = graph_error_text(text)
    return one_line(f"{type(error).__name__}: {text}")


def graph_error_text(text: str) -> str:
    """A TensorFlow graph's error without what only its authors read: the Python frames where the failing op
    was defined (`Graph execution error: Detected at node ... defined at`), the `[[{{node ...}}]]` and
    `[Op:...]` marks and the `{{function_node ...}}` prefix."""
    text = re.sub(r"\{\{function_node [^}]*\}\}", "", text)
    text = re.sub(r"\s*\[\[[^\]]*\]\]|\s*\[Op:[^\]]*\]", "", text)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        lines = [line for line in lines[1:] if not line.startswith(("  File ", "Detected at node "))]
    return "\n".join(lines) or text


def report(error: BaseException) -> None:
    typer.echo(f"error: {error_line(error)}", err=True)


def clean_errors(command):
    """Every error of a command -> one line on stderr, exit code 2 (Ctrl-C: exit code 130)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:  # `| head -1`: the reader has what it wanted; end quietly, as `cat` does (SIGPIPE)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # (Python's own flush at exit would fail on the pipe again)
            raise typer.Exit(128 + 13) from None
        except KeyboardInterrupt as e:
            message = getattr(e, "message", "interrupted")  # (Interrupted: where a run stopped, or "" on rank > 0)
            if message:
                typer.echo(f"error: {message}", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if os.environ.get(DEBUG_ENV) and not isinstance(e, BlenderbotError):
                raise
            report(e)
            raise typer.Exit(2) from None

    return wrapper


def _interrupt_on_sigterm(command):
    """While `command` runs, SIGTERM raises KeyboardInterrupt, so that what it writes is cleaned up as on Ctrl-C
    (`kill`, `timeout` and `docker stop` send SIGTERM)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return command(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return command(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


# ---------------------------------------------------------------------- models
class Bot:
    """A model and its tokenizer on one backend: conversation turns in, reply text out."""

    def __init__(self, model_path: str | None, backend: str = "torch", device: str | None = None,
                 quantize: str | None = None):
        from .config import BlenderbotConfig
        from .hub import resolve_folder
        from .tokenizer import BlenderbotTokenizer

        if model_path is None:
            from .default_model import default_model_path

            model_path = default_model_path()
        self.folder = resolve_folder(model_path)
        self.config = BlenderbotConfig.from_pretrained(self.folder)  # checked before any framework loads
        self.tokenizer = BlenderbotTokenizer.from_pretrained(self.folder)
        self.backend, self.device = backend, device
        self.model = load_model(self.folder, backend, device, quantize)

    def history(self, persona=()):
        """An empty chat history for this model (ids kept, cut from the left to its positions; the persona
        lines kept)."""
        from .conversation import ChatHistory

        return ChatHistory(self.tokenizer, max_length=self.config.max_position_embeddings, persona=persona)

    def encode(self, turns, persona=()) -> list[int]:
        """Encoder ids of turns whose roles alternate back from the last, the user's (the one before it is the
        bot's, whatever their number), after the persona lines; special tokens typed in a turn are text."""
        history = self.history(persona)
        for i, turn in enumerate(turns):
            (history.add_user if (len(turns) - 1 - i) % 2 == 0 else history.add_reply)(turn)
        return history.input_ids()

    def reply(self, ids: list[int], **settings) -> str:
        """The decoded reply to encoder ids (special tokens skipped, leading space kept, as the history wants it)."""
        settings = {k: v for k, v in settings.items() if v is not None}
        sequences = generate_ids(self.model, self.backend, ids, self.device, **settings)
        return self.tokenizer.decode(sequences[0], skip_special_tokens=True)


def load_model(folder: str, backend: str, device: str | None = None, quantize: str | None = None):
    from ._backends import require

    require(backend)
    if device is not None and backend != "torch":
        raise InputError(f"--device is for the torch backend; {backend} places the model on its own")
    if quantize is not None and (backend != "torch" or device not in (None, "cpu")):
        raise InputError(f"--quantize {quantize} is for the torch backend on the CPU")
    if backend == "torch":
        import torch

        from .torch import BlenderbotForConditionalGeneration

        try:
            device = torch.device(device) if device else None
        except RuntimeError as e:
            raise InputError(f"unknown device {device!r}: {one_line(e, 200)}") from None
        if device is not None and device.type == "meta":
            raise InputError("device 'meta' holds no weights, so it cannot reply; choose cpu, cuda or mps")
        from .torch.quantization import quantize as quantized

        model = quantized(BlenderbotForConditionalGeneration.from_pretrained(folder).eval(), quantize)
        try:
            model = model.to(device) if device else model
        except (RuntimeError, AssertionError) as e:  # e.g. cuda on a machine without it
            raise InputError(f"device {str(device)!r} is not available: {one_line(e, 200)}") from None
        if quantize is None and (model.device.type, model.dtype) == ("cpu", torch.float32) and \
                torch.backends.mkldnn.is_available():
            model.pack_decoding()  # float32 on the CPU: the fastest step, the same tokens (docs/benchmarks.md)
        return model
    if backend == "tf":
        from .tf import TFBlenderbotForConditionalGeneration

        return TFBlenderbotForConditionalGeneration.from_pretrained(folder)
    from .flax import FlaxBlenderbotForConditionalGeneration

    keep_jax_compiles()
    return FlaxBlenderbotForConditionalGeneration.from_pretrained(folder)


def keep_jax_compiles() -> str | None:
    """The command line's Flax models keep what XLA compiles in `<cache home>/jax` (JAX's persistent
    compilation cache): a later `generate`, `chat` or `serve` with the same settings loads the compiled search
    instead of compiling it again (the default model's first reply: 4.7 s, then 3.1 s on the development
    CPU). A folder given to JAX (`JAX_COMPILATION_CACHE_DIR`) is kept; nothing is set where the folder cannot
    be made. Returns the folder in use, if any."""
    import jax

    from .fileio import cache_home

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = os.path.join(cache_home(), "jax")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    _drop_empty_entries(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def _drop_empty_entries(folder: str) -> None:
    """Remove the empty entries a write cut short leaves (a full disk): JAX would warn that it cannot read them
    on every later run, and never write them again."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_size == 0:
                    os.unlink(entry.path)
    except OSError:  # (a folder it cannot read or change: JAX's own warnings then say what is wrong)
        pass


def use_kernels(bot: Bot) -> None:
    """--kernels: the torch model decodes with the Triton kernel step (`kernel_decoding()`), its search left
    eager (compiling it would cost seconds for each new set of settings); refused where it can't run."""
    if bot.backend != "torch":
        raise InputError(f"--kernels is for the torch backend (NVIDIA GPUs), not {bot.backend}")
    if bot.model.device.type != "cuda":
        raise InputError(f"--kernels runs Triton kernels on NVIDIA GPUs; the model is on {bot.model.device.type} "
                         "(pass --device cuda)")
    bot.model.kernel_decoding(compile_search=False)


def generate_ids(model, backend: str, ids: list[int], device: str | None = None, **settings) -> list[list[int]]:
    """Run the backend's generate() on one encoded conversation; the sequences as lists of ints. Every backend
    takes the same arguments (numpy ids, seed=, streamer=)."""
    import random

    import numpy as np

    if settings.get("seed") is None:  # without --seed, each reply samples afresh in every backend (Flax's
        settings = {**settings, "seed": random.randrange(2**64)}  # generate() defaults to seed 0, as its reference)
    out = model.generate(input_ids=np.array([ids], dtype=np.int64), **settings)
    return sequence_lists(out)


def sequence_lists(out) -> list[list[int]]:
    """generate()'s sequences (or a GenerateOutput's) as lists of ints, from any backend and device (a CUDA
    tensor is copied to the host first: NumPy cannot read device memory)."""
    import numpy as np

    sequences = getattr(out, "sequences", out)
    if hasattr(sequences, "detach"):  # PyTorch
        sequences = sequences.detach().cpu()
    return np.asarray(sequences).tolist()


class EchoStreamer:
    """Prints a reply while it is generated (the transformers streamer protocol): text the tokens made final,
    without the leading space, then a newline."""

    def __init__(self, tokenizer, prefix: str = ""):
        self.tokenizer, self.prefix = tokenizer, prefix
        self.ids: list[int] = []
        self.shown, self.prompt_seen = "", False

    def put(self, token_ids) -> None:
        if not self.prompt_seen:  # the decoder start token
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in token_ids[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if not self.shown and text:
            typer.echo(self.prefix, nl=False)
        typer.echo(text[len(self.shown):], nl=False)
        self.shown = text

    def end(self) -> None:
        if not self.shown:
            typer.echo(self.prefix, nl=False)
        typer.echo("")


# ---------------------------------------------------------------------- shared options
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model folder or hub id (default: the embedded default model).")]
BackendOption = Annotated[Backend, typer.Option(help="Framework to run the model with.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="PyTorch device, e.g. cpu or cuda:0.")]
QuantizeOption = Annotated[Optional[Quantization], typer.Option(
    help="int8: int8 weights for faster CPU decoding (torch backend; replies can differ slightly).")]
BeamsOption = Annotated[Optional[int], typer.Option(help="Beam width (default: the model's setting).")]
MaxNewOption = Annotated[Optional[int], typer.Option(help="Most tokens in the reply.")]
MinLengthOption = Annotated[Optional[int], typer.Option(
    help="Least decoder length (counts the start token, as transformers does).")]
NgramOption = Annotated[Optional[int], typer.Option(help="Never repeat an n-gram of this size in the reply.")]
SampleOption = Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy/beam search.")]
TemperatureOption = Annotated[Optional[float], typer.Option(help="Sampling temperature.")]
TopKOption = Annotated[Optional[int], typer.Option(help="Sample among the k likeliest tokens.")]
TopPOption = Annotated[Optional[float], typer.Option(help="Sample within this probability mass.")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed for sampling (repeatable replies).", min=0,
                                                   max=2**32 - 1)]
PersonaOption = Annotated[Optional[list[str]], typer.Option(
    "--persona", "-p", metavar="TEXT", help="A persona line for the bot, e.g. 'I love cats.' (repeatable; becomes 'your persona: "
                            "...', as BlenderBot was trained; kept when a long history is cut).")]
KernelsOption = Annotated[bool, typer.Option(
    "--kernels", help="Decode with Triton kernels (torch on an NVIDIA GPU; the fastest step there: each new batch "
                      "shape of more than 32 rows compiles once, for seconds).")]


def _settings(num_beams, max_new_tokens, min_length, no_repeat_ngram_size, do_sample, temperature, top_k, top_p,
              seed) -> dict:
    return dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_length=min_length,
                no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample or None, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed)


# ---------------------------------------------------------------------- commands
@app.command()
@clean_errors
@_interrupt_on_sigterm
def generate(
    text: Annotated[list[str], typer.Argument(help="The message (words are joined with spaces; - reads it from "
                                                   "stdin).", metavar="TEXT...", show_default=False)],
    context: Annotated[Optional[list[str]], typer.Option(
        "--context", "-c", metavar="TEXT", help="An earlier turn, oldest first (repeatable); roles alternate back from the message: "
                                "the last --context is the bot's.")] = None,
    persona: PersonaOption = None, model: ModelOption = None, backend: BackendOption = Backend.torch, device: DeviceOption = None,
    quantize: QuantizeOption = None, num_beams: BeamsOption = None, max_new_tokens: MaxNewOption = None, min_length: MinLengthOption = None,
    no_repeat_ngram_size: NgramOption = None, do_sample: SampleOption = False, temperature: TemperatureOption = None,
    top_k: TopKOption = None, top_p: TopPOption = None, seed: SeedOption = None, kernels: KernelsOption = False,
):
    """Print the model's reply to TEXT."""
    turns = [*(context or []), _stdin_message() if text == ["-"] else " ".join(text)]
    for i, turn in enumerate(turns):  # before loading anything: arguments that are not UTF-8, or too long
        check_text(turn, "the message" if i == len(turns) - 1 else f"--context {i + 1}", turn=True)
        if not turn.strip():
            raise InputError(("the message" if i == len(turns) - 1 else f"--context {i + 1}") +
                             " is empty: give the text to reply to")
    persona = _persona_lines(persona)
    bot = Bot(model, backend.value, device, quantize.value if quantize else None)
    if kernels:
        use_kernels(bot)
    settings = _checked_settings(bot, num_beams, max_new_tokens, min_length, no_repeat_ngram_size, do_sample,
                                 temperature, top_k, top_p, seed)
    typer.echo(_in_flag_words(bot.reply, bot.encode(turns, persona), **settings).strip())


@app.command()
@clean_errors
@_interrupt_on_sigterm
def chat(
    persona: PersonaOption = None, model: ModelOption = None, backend: BackendOption = Backend.torch, device: DeviceOption = None,
    quantize: QuantizeOption = None, num_beams: BeamsOption = None, max_new_tokens: MaxNewOption = None, min_length: MinLengthOption = None,
    no_repeat_ngram_size: NgramOption = None, do_sample: SampleOption = False, temperature: TemperatureOption = None,
    top_k: TopKOption = None, top_p: TopPOption = None, seed: SeedOption = None, kernels: KernelsOption = False,
):
    """Chat: one message per line on stdin, one reply per line. /reset forgets the history, /help lists the
    commands, /quit (or EOF) ends; a message that begins with / is typed as //. At a terminal, lines can be
    edited and earlier ones recalled with the arrow keys.

    The history goes to the model each turn, cut from the left to its 128 tokens, so the newest turns
    survive. Works with piped input:

    \b
        printf 'Hi!\\nHow are you?\\n' | blenderbot-mb chat

    A line that is not UTF-8 text, or too long, is refused with one error line and the chat goes on; the exit
    code is then 2. Special tokens typed in a message ("</s>", "<mask>") are text.
    """
    persona = _persona_lines(persona)
    bot = Bot(model, backend.value, device, quantize.value if quantize else None)
    if kernels:
        use_kernels(bot)
    settings = _checked_settings(bot, num_beams, max_new_tokens, min_length, no_repeat_ngram_size, do_sample,
                                 temperature, top_k, top_p, seed)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(CHAT_COMMANDS, err=True)
    history, refused = bot.history(persona), False
    lines = _terminal_lines("you> ") if interactive and sys.stdout.isatty() else _stdin_lines(
        prompt="you> " if interactive else None)
    for line in lines:
        if isinstance(line, InputError):
            report(line)
            refused = True
            continue
        message = line.strip()
        if not message:
            continue
        command = message.split()[0] if re.match(r"/[A-Za-z]", message) else None
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            history.reset()
            typer.echo("(history cleared)", err=True)
            continue
        if command == "/help":
            typer.echo(CHAT_COMMANDS, err=True)
            continue
        if command is not None:
            report(InputError(f"unknown command {command}; /help lists the commands (a message that begins with "
                              f"/ is typed as //{message[1:]})"))
            refused = True
            continue
        if message.startswith("//"):
            message = message[1:]
        try:
            history.add_user(message)
        except InputError as e:
            report(e)
            refused = True
            continue
        streamer = EchoStreamer(bot.tokenizer, "bot> " if interactive else "")
        history.add_reply(_in_flag_words(bot.reply, history.input_ids(), streamer=streamer, **settings))
    if refused:
        raise typer.Exit(2)


CHAT_COMMANDS = ("Type a message (one that begins with / as //); /reset clears the history, /help shows this, "
                 "/quit or Ctrl-D ends.")

# generate()'s names of the command line's settings, as the options spell them
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "num_beams", "max_new_tokens", "min_length", "no_repeat_ngram_size", "temperature", "top_k", "top_p", "seed")}


def _checked_settings(bot, num_beams, max_new_tokens, min_length, no_repeat_ngram_size, do_sample, temperature,
                      top_k, top_p, seed) -> dict:
    """The generation settings of generate and chat, with the checks that need the model: a reply longer than
    its positions, sampling options without sampling (a warning, as transformers gives)."""
    positions = bot.config.max_position_embeddings
    if max_new_tokens is not None and max_new_tokens > positions - 1:
        raise InputError(f"--max-new-tokens: at most {positions - 1} for this model ({positions} positions, one of "
                         "them the start token's)")
    sampling = do_sample or getattr(bot.model.generation_config, "do_sample", False)
    unused = [FLAGS[name] for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
              if value is not None]
    if unused and not sampling:
        typer.echo(f"warning: {' and '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only when sampling: "
                   "add --do-sample", err=True)
    return _settings(num_beams, max_new_tokens, min_length, no_repeat_ngram_size, do_sample, temperature, top_k,
                     top_p, seed)


def _in_flag_words(reply, *args, **settings) -> str:
    """`reply(*args, **settings)`, a setting's error naming the option that set it (`--num-beams`), not the
    generation setting (`num_beams`)."""
    from .errors import ConfigError

    try:
        return reply(*args, **settings)
    except ConfigError as e:
        message = str(e)
        for name, flag in FLAGS.items():
            if settings.get(name) is not None:
                message = message.replace(f"generation setting {name!r}", flag).replace(f"'{name}'", flag)
        if message == str(e):
            raise
        raise ConfigError(message) from None


def _stdin_message() -> str:
    """generate's message from stdin (`generate -`): its text, lines joined with spaces."""
    lines = list(_stdin_lines())
    for line in lines:
        if isinstance(line, InputError):
            raise line
    return " ".join(" ".join(lines).split())


def _persona_lines(persona: list[str] | None) -> list[str]:
    """--persona lines, checked before anything loads (UTF-8 text of a turn's length, one line, not empty)."""
    lines = [p.strip() for p in persona or ()]
    for i, line in enumerate(lines, 1):
        check_text(line, f"--persona {i}", turn=True)
        if not line or "\n" in line:
            raise InputError(f"--persona {i} must be one non-empty line, e.g. --persona 'I love cats.'")
    return lines


def _terminal_lines(prompt: str):
    """Lines typed at a terminal, read by input() with readline's line editing and history (arrow keys, where
    the platform has readline; the prompt goes to the terminal). A line that is not UTF-8 comes as an
    InputError; the turn's length is checked where the turn is made."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # (Windows: the console's own editing)
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:  # Ctrl-D: end the prompt's line, so that the shell's prompt starts on a new one
            typer.echo("", err=True)
            return
        except UnicodeDecodeError as e:
            yield InputError(f"the line is not UTF-8 text: byte {e.start} is {e.object[e.start:e.start + 1]!r}")


def _stdin_lines(prompt: str | None = None):
    """Lines of stdin as text. A line that is not UTF-8, or too long to be a turn, comes as an InputError
    (read in bounded pieces: a 50 MB line never sits in memory whole)."""
    raw = getattr(sys.stdin, "buffer", None)
    most = 4 * limit("turn_chars") + 2  # UTF-8 takes at most 4 bytes a character, then \r\n
    first = True
    while True:
        if prompt:
            typer.echo(prompt, nl=False, err=True)
        if raw is None:  # a text stream without bytes underneath (embedding applications)
            line = sys.stdin.readline()
            if not line:
                return
            yield line
            continue
        data = raw.readline(most + 1)
        first, was_first = False, first
        if not data:
            if prompt:  # Ctrl-D at the prompt: end its line, so that the shell's prompt starts on a new one
                typer.echo("", err=True)
            return
        if len(data) > most:
            while data and not data.endswith(b"\n"):  # skip the rest of the line
                data = raw.readline(1 << 20)
            yield InputError(f"a line of more than {most} bytes is longer than a turn may be "
                             f"({limit('turn_chars')} characters); to raise it, set {LIMITS_ENV}=turn_chars=N")
            continue
        try:
            yield data.decode("utf-8-sig" if was_first else "utf-8")  # (a byte order mark: a Windows editor's file)
        except UnicodeDecodeError as e:
            yield InputError(f"the line is not UTF-8 text: byte {e.start} is {data[e.start:e.start + 1]!r}")


@app.command()
@clean_errors
@_interrupt_on_sigterm
def convert(
    src: Annotated[str, typer.Argument(help="Model folder, hub id, or ParlAI checkpoint file.")],
    dst: Annotated[str, typer.Argument(help="Output folder.")],
    to: Annotated[Format, typer.Option(help="Output format.")] = Format.safetensors,
    from_parlai: Annotated[Optional[bool], typer.Option(
        help="SRC is (or is not) an original ParlAI *.pt checkpoint (default: told from the file).")] = None,
    allow_pickle: Annotated[bool, typer.Option(
        help="Allow reading pickles (pytorch_model.bin, ParlAI files) with torch.load(weights_only=True).")] = False,
    max_shard_size: Annotated[Optional[str], typer.Option(
        help="Shard safetensors above this size, e.g. 2GB (default 5GB).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Folder to copy tokenizer files from.")] = None,
    force: Annotated[bool, typer.Option(help="Replace DST if it exists and is not empty.")] = False,
    dtype: Annotated[Optional[DType], typer.Option(help="Cast the weights to this dtype.")] = None,
    verify: Annotated[bool, typer.Option(
        help="Run SRC and the result on the same inputs before the result replaces DST; exit 1 (DST left as it "
             "was) if their logits differ beyond the tolerance.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Convert a checkpoint to safetensors, pytorch_model.bin, tf_model.h5 or flax_model.msgpack, or export it
    for another runtime: onnx, savedmodel (TensorFlow), ctranslate2 (see docs/export.md)."""
    from .checkpoint import DEFAULT_MAX_SHARD_SIZE
    from .convert import convert_checkpoint, verify_conversion
    from .export import EXPORT_FORMATS, export_model

    out = os.path.abspath(dst)  # named before the swap: DST may be the working folder
    if to.value in EXPORT_FORMATS:
        ignored = [name for name, value in (("--from-parlai", from_parlai), ("--max-shard-size", max_shard_size),
                                            ("--tokenizer", tokenizer), ("--dtype", dtype),
                                            ("--verify", verify)) if value]
        if ignored:
            raise InputError(f"{', '.join(ignored)}: not for --to {to.value}; an export takes a model folder as it "
                             "is, with its own tokenizer, and is tested by its own runtime (docs/export.md)")
        export_model(src, dst, to=to.value, allow_pickle=allow_pickle, force=force)
    else:
        def check(folder: str) -> None:  # the written folder, before it replaces DST
            result = verify_conversion(src, folder, to=to.value, allow_pickle=allow_pickle,
                                       from_parlai=from_parlai, dtype=dtype.value if dtype else None)
            typer.echo(str(result), err=not result.ok)
            if not result.ok:
                typer.echo(f"nothing written: {dst} left as it was", err=True)
                raise typer.Exit(1)

        convert_checkpoint(src, dst, to=to.value, allow_pickle=allow_pickle,
                           max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                           from_parlai=from_parlai, tokenizer=tokenizer, force=force,
                           dtype=dtype.value if dtype else None, progress=not quiet, check=check if verify else None)
    files = ", ".join(sorted(f for f in os.listdir(out) if not f.startswith(".")))
    typer.echo(f"wrote {dst}: {files}")


@app.command()
@clean_errors
@_interrupt_on_sigterm
def info(model: Annotated[str, typer.Argument(help="Model folder or hub id.")]):
    """Summarize a model: architecture, parameter count, generation settings, files."""
    from .config import BlenderbotConfig
    from .generation_config import GenerationConfig
    from .hub import resolve_folder
    from .naming import LOGITS_BIAS, base_architecture, tensor_specs

    folder = resolve_folder(model)
    config = BlenderbotConfig.from_pretrained(folder)
    arch = base_architecture((config.extra.get("architectures") or ["BlenderbotForConditionalGeneration"])[0])
    params = 0
    for spec in tensor_specs(config, arch):
        if spec.kind != LOGITS_BIAS:  # a buffer, not a parameter
            n = 1
            for d in spec.shape:
                n *= d
            params += n
    generation = GenerationConfig.from_pretrained(folder, config)
    lines = [
        f"model: {folder}",
        f"architecture: {arch}",
        f"parameters: {params:,}",
        f"d_model {config.d_model}, layers {config.encoder_layers} encoder + {config.decoder_layers} decoder, "
        f"heads {config.encoder_attention_heads}/{config.decoder_attention_heads}, "
        f"ffn {config.encoder_ffn_dim}/{config.decoder_ffn_dim}",
        f"vocabulary {config.vocab_size}, positions {config.max_position_embeddings}, "
        f"activation {config.activation_function}, scale_embedding {config.scale_embedding}",
        "generation: " + (", ".join(f"{k}={v}" for k, v in sorted(generation.to_diff_dict().items())) or "defaults"),
        "format: " + _folder_format(folder),
        "files:",
    ]
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(root, name)
            lines.append(f"  {os.path.relpath(path, folder)}  {_size(os.path.getsize(path))}")
    typer.echo("\n".join(lines))


def _folder_format(folder: str) -> str:
    """What a model folder's weights are: its checkpoint file, or the runtime export it holds."""
    from .checkpoint import EXPORTS, export_kind, weights_file_name
    from .errors import CheckpointError

    try:
        return f"checkpoint ({weights_file_name(folder)})"
    except CheckpointError:
        kind = export_kind(folder)
        return EXPORTS[kind] if kind else "no weights (config and tokenizer only)"


@app.command()
@clean_errors
def serve(
    model: ModelOption = None, backend: BackendOption = Backend.torch, device: DeviceOption = None,
    dtype: Annotated[Optional[str], typer.Option(help="torch weights dtype: float32, bfloat16, float16.")] = None,
    quantize: QuantizeOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for a batch to fill.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Most waiting requests; more get 503.")] = 1024,
    store: Annotated[Optional[str], typer.Option(
        help="Conversation store: an SQLite file (default in the cache folder) or redis://host:port/db.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model name clients must send.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    engine: Annotated[ServeEngine, typer.Option(
        help="Where the model decodes: a process of its own (the HTTP side never waits for it) or a thread of "
             "the server's process.")] = ServeEngine.process,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning: no line per request).")] = "info",
    kernels: KernelsOption = False,
    allow_origin: Annotated[Optional[list[str]], typer.Option(
        "--allow-origin", help="A web origin whose pages may call the API from a browser (CORS), e.g. "
                               "https://chat.example.com; repeatable; '*' for any.")] = None,
    drain_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds the requests in flight may take to finish after SIGTERM; those still running are "
                    "then answered 503.")] = 30.0,
):
    """Serve the model over HTTP: OpenAI-style chat completions, conversations, a chat page (docs/serve.md)."""
    from .serve import serve as run_server

    run_server(model=model, backend=backend.value, device=device, dtype=dtype,
               quantize=quantize.value if quantize else None, host=host, port=port,
               max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, store=store,
               served_model_name=served_model_name, threads=threads, engine=engine.value, log_level=log_level,
               kernels=kernels, allow_origins=tuple(allow_origin or ()), drain_timeout=drain_timeout)


@app.command("default-model")
@clean_errors
@_interrupt_on_sigterm
def default_model():
    """Print the folder of the default model that ships inside the package (its files checked)."""
    from .default_model import default_model_path

    typer.echo(default_model_path())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


_register_training(app, lambda command: clean_errors(_interrupt_on_sigterm(command)))  # SIGTERM: as Ctrl-C


class _LevelLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning in the command's output is one `warning:` line (not a source path and a line of code)."""
    typer.echo(f"warning: {one_line(str(message))}", err=True)


# what TensorFlow's C++ prints on import before its log level applies (absl's preamble, CUDA stubs on a machine
# without a GPU, factories registered twice); other lines it prints are passed on
_TF_IMPORT_NOISE = ("All log messages before absl::InitializeLog()", "cudart_stub.cc", "Unable to register cu",
                    "computation placer already registered", "TF-TRT Warning", "oneDNN custom operations")


def _uses_tensorflow(argv: list[str]) -> bool:
    pairs = {" ".join(argv[i:i + 2]) for i in range(len(argv))} | set(argv)
    return bool(pairs & {"--backend tf", "--backend=tf", "--to savedmodel", "--to=savedmodel"}) or (
        "--verify" in argv and (bool(pairs & {"--to tf", "--to=tf"}) or any(  # a TF checkpoint verified
            os.path.isfile(os.path.join(a, "tf_model.h5")) for a in argv if not a.startswith("-"))))


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its import-time C++ noise filtered out of stderr (file descriptor 2)."""
    import importlib.util
    import tempfile

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", "replace").splitlines()
            kept = [line for line in lines if line.strip() and not any(n in line for n in _TF_IMPORT_NOISE)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors (an unknown option, a value of the wrong type) are one line too."""
    # TensorFlow's C++ logs (a GPU it cannot find, XLA notes) are not the command's output; errors still come
    # as one `error:` line. A value set by the user wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if _uses_tensorflow(sys.argv[1:] if argv is None else list(argv)):
        import signal
        import threading

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
        try:  # (seconds long: Ctrl-C or SIGTERM meanwhile is an interrupted command like any other)
            _import_tensorflow_quietly()
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception:  # noqa: BLE001 - the command imports it again and reports what goes wrong
            pass
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    log = logging.getLogger("blenderbot_mb")  # the package's log warnings as `warning:` lines too
    handler = None if log.handlers else logging.StreamHandler()
    if handler is not None:
        handler.setFormatter(_LevelLine())
        handler.one_line = True
        log.addHandler(handler)
    try:
        with warnings.catch_warnings():  # restored after the command (main() is also called in-process)
            warnings.showwarning = _warning_line
            code = app(args=argv, standalone_mode=False, prog_name="blenderbot-mb")
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if not hasattr(e, "format_message"):  # not click's: a command's errors are reported by clean_errors
            raise
        message = one_line(e.format_message())
        if message:  # empty for a bare `blenderbot-mb`, which prints the help
            typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    finally:
        if handler is not None:
            log.removeHandler(handler)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
