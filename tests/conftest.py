import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# the package's cache folder (locks, the server's database, the command line's JAX compiles): the run's own
os.environ.setdefault("BLENDERBOT_MB_HOME", tempfile.mkdtemp(prefix="blenderbot-mb-tests-"))

# Triton and TensorFlow both bundle LLVM; Triton loaded after TensorFlow aborts the process (duplicate LLVM
# options), the other order works. The suite imports TensorFlow, and torch.compile loads Triton where it is
# installed (the test extra installs it for the kernels' interpreted tests): Triton first.
try:
    import triton  # noqa: F401
except ImportError:
    pass


def pytest_collection_finish(session):
    """Tests that run a long suite in a process of their own start it now, to overlap the rest of the run
    (a module's `start_interpreted_cases`: test_torch_kernels.py's)."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_interpreted_cases", None)
        if start is not None and item.name == "test_interpreted_kernels_and_kernel_step":
            start()


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the package's small dialogue corpus, saved in HF layout."""
    from blenderbot_mb.tokenizer import corpus_lines, train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(corpus_lines(), vocab_size=400)
    tok.save_pretrained(folder)
    return str(folder)
