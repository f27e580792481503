"""One of the suite's long checks in a process of its own, so that it can run beside the rest of the suite:

    python tests/early_check.py MODULE:FUNCTION

calls FUNCTION of tests/MODULE.py with a fresh temporary folder and the test tokenizer's folder (conftest's),
then prints CHECK PASSED, or SKIPPED: and the reason where the check skipped. helpers.start_check starts it
(in the lane of long checks, as soon as the suite is collected); helpers.run_check is the test that reads it.
"""

import importlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import conftest  # noqa: E402  (the suite's environment, and Triton imported before TensorFlow)
import helpers  # noqa: E402
import pytest  # noqa: E402


def main() -> None:
    module, name = sys.argv[1].split(":")
    check = getattr(importlib.import_module(module), name)
    helpers.tensorflow_graph_optimizer_off()
    with tempfile.TemporaryDirectory(prefix="blenderbot-mb-check-") as folder:
        tokenizer = conftest.build_tokenizer(os.path.join(folder, "tokenizer"))
        run = os.path.join(folder, "run")
        os.makedirs(run)
        try:
            check(run, tokenizer)
        except pytest.skip.Exception as e:
            print(f"SKIPPED: {e.msg}")
            return
    print("CHECK PASSED")


if __name__ == "__main__":
    main()
