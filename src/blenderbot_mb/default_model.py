"""The default model that ships inside the package.

`blenderbot-mb generate` / `chat` / `serve` without `--model` use it. It is a small Blenderbot (the same
architecture as the published checkpoints, fewer and narrower layers) trained with `blenderbot-mb train`
on the `chitchat-dataset` corpus; its weights are fp16 safetensors in `blenderbot_mb/data/default_model/`.
docs/default_model.md gives its size, held-out perplexity, checksums, sample replies and the one command
that rebuilds it (`python -m blenderbot_mb.default_model_recipe all`).

    >>> from blenderbot_mb.default_model import default_model_path
    >>> folder = default_model_path()   # checked against its SHA256SUMS once per process
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources

from .errors import CheckpointError

CHECKSUMS = "SHA256SUMS"
_verified: set[str] = set()


def packaged_folder() -> str:
    """Where the default model's files lie inside the installed package."""
    return str(resources.files("blenderbot_mb").joinpath("data", "default_model"))


def verify(folder: str) -> None:
    """Every file listed in the folder's SHA256SUMS is present, complete and unchanged, else CheckpointError."""
    listing = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(listing):
        raise CheckpointError(f"the default model is missing from the installed package ({folder}); "
                              "reinstall blenderbot-mb")
    with open(listing, encoding="utf-8") as f:
        entries = [line.split(maxsplit=1) for line in f if line.strip()]
    for digest, name in entries:
        path = os.path.join(folder, name.strip())
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise CheckpointError(f"the default model's file {name.strip()} cannot be read ({e.strerror}); "
                                  "reinstall blenderbot-mb") from None
        if h.hexdigest() != digest:
            raise CheckpointError(f"the default model's file {name.strip()} is damaged (checksum mismatch); "
                                  "reinstall blenderbot-mb")


def default_model_path() -> str:
    """The folder of the packaged default model, its files checked once per process."""
    folder = packaged_folder()
    if folder not in _verified:
        verify(folder)
        _verified.add(folder)
    return folder
