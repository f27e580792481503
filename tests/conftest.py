import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# the package's cache folder (locks, the server's database, the command line's JAX compiles): the run's own
if "BLENDERBOT_MB_HOME" not in os.environ:
    os.environ["BLENDERBOT_MB_HOME"] = tempfile.mkdtemp(prefix="blenderbot-mb-tests-")
    atexit.register(shutil.rmtree, os.environ["BLENDERBOT_MB_HOME"], True)
# XLA's compiles kept for the whole run, its subprocesses included (JAX's persistent cache, in the folder the
# command line uses): a Flax run killed and resumed compiled its update three times, one process after another
# (100 s of CPU on the development machine, 55 s with the cache)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["BLENDERBOT_MB_HOME"], "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA's LLVM backend at its lowest optimization level, for the suite's JAX and TensorFlow compiles (CPU): the
# tiny models' programs run for milliseconds, their compiles for seconds (three Flax training and sampling
# tests: 74 s, 56 s at level 0). The level changes how fast the machine code runs, not what it computes.
from helpers import XLA_FLAGS  # noqa: E402  (helpers imports no framework)

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
# one thread for each TensorFlow operation: the run's processes share two cores, and TensorFlow's spinning
# threads took ~15% more CPU on its training tests
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
# and one OpenMP thread for PyTorch (read when torch is first imported, after this): its second thread waited
# spinning for the first on the busy cores (~10% more CPU on the PyTorch decoding tests)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton and TensorFlow both bundle LLVM; Triton loaded after TensorFlow aborts the process (duplicate LLVM
# options), the other order works. The suite imports TensorFlow, and torch.compile loads Triton where it is
# installed (the test extra installs it for the kernels' interpreted tests): Triton first.
try:
    import triton  # noqa: F401
except ImportError:
    pass


def pytest_collection_modifyitems(session, config, items):
    """Tests that wait for a long subprocess (an `early` attribute) run last, in their order: the rest of the run
    overlaps those subprocesses instead of waiting for them midway (on two cores the run waited ~4 minutes for
    the TensorFlow workers' checks, then went on with one core idle)."""
    items.sort(key=lambda item: getattr(getattr(item, "function", None), "early", None) is not None)


def pytest_collection_finish(session):
    """Tests with a long subprocess (an `early` attribute: helpers.start_early) start it now, so that it
    overlaps the rest of the run."""
    if session.config.option.collectonly:
        return
    from helpers import tensorflow_graph_optimizer_off

    tensorflow_graph_optimizer_off()  # (the test modules are imported by now)
    for item in session.items:
        early = getattr(getattr(item, "function", None), "early", None)
        if early is not None:
            early()


def build_tokenizer(folder: str) -> str:
    """A byte-level BPE tokenizer trained on the package's small dialogue corpus, saved in HF layout in `folder`."""
    from blenderbot_mb.tokenizer import corpus_lines, train_tokenizer

    train_tokenizer(corpus_lines(), vocab_size=400).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """build_tokenizer's, once a run."""
    return build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
