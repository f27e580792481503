"""Run with a Python that has transformers 4.x and its TF (tf-keras) and Flax classes:

    python write_hf4_files.py FOLDER OUT

Loads the PyTorch checkpoint FOLDER (written by blenderbot-mb) into transformers' own TFBlenderbot and
FlaxBlenderbot classes (`from_pt=True`), saves them with transformers' `save_pretrained` (so OUT/tf holds a
real `tf_model.h5` and OUT/flax a real `flax_model.msgpack`), and stores their logits for FOLDER/inputs.npz
in OUT/logits.npz. tests/test_hf4_files.py drives it; transformers 4.x and Keras 3 cannot share one
environment, so it runs in its own (`nox -s oracle_hf4`).
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from transformers import FlaxBlenderbotForConditionalGeneration, TFBlenderbotForConditionalGeneration  # noqa: E402


def main(folder: str, out: str) -> None:
    inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
    tf_model = TFBlenderbotForConditionalGeneration.from_pretrained(folder, from_pt=True)
    tf_model.save_pretrained(os.path.join(out, "tf"))
    flax_model = FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, from_pt=True)
    flax_model.save_pretrained(os.path.join(out, "flax"))
    tf_logits = tf_model(**{k: v.astype(np.int32) for k, v in inputs.items()}).logits.numpy()
    flax_logits = np.asarray(flax_model(**{k: v.astype(np.int32) for k, v in inputs.items()}).logits)
    np.savez(os.path.join(out, "logits.npz"), tf=tf_logits, flax=flax_logits)


if __name__ == "__main__":
    main(*sys.argv[1:3])
