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

# Triton and TensorFlow both bundle LLVM; Triton loaded after TensorFlow aborts the process (duplicate LLVM
# options), the other order works. The suite imports TensorFlow, and torch.compile loads Triton where it is
# installed (the test extra installs it for the kernels' interpreted tests): Triton first.
try:
    import triton  # noqa: F401
except ImportError:
    pass


def pytest_collection_finish(session):
    """Tests with a long subprocess (an `early` attribute: helpers.start_early) start it now, so that it
    overlaps the rest of the run."""
    if session.config.option.collectonly:
        return
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
