"""Finding a model folder: a local path, or a Hugging Face hub id fetched with huggingface_hub.

Downloads are optional; HF_HUB_OFFLINE=1 (or local_files_only=True) uses only the local cache.
Only the files this package reads are fetched.
"""

from __future__ import annotations

import os
import re

from .errors import CheckpointError
from .fileio import check_folder_files

ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tf_model.h5", "flax_model.msgpack", "vocab.json", "merges.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
]
PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def pop_hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def resolve_folder(name_or_path: str | os.PathLike, allow_pickle: bool = False, **hub_kwargs) -> str:
    """A local folder holding the model files for `name_or_path`.

    Every model file the folder holds (config, weights, tokenizer files) is checked first: a regular file,
    inside the folder once symlinks are resolved (see `fileio.checked_file`).
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        check_folder_files(path, [p for p in ALLOW_PATTERNS + PICKLE_PATTERNS if "*" not in p])
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    if (path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", "", 1)
            or "\\" in path or re.match(r"[A-Za-z]:", path)):  # (a Windows path is no hub id either)
        raise CheckpointError(f"no model folder at {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{path} is not a local folder and huggingface_hub is not installed") from None
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(path, allow_patterns=patterns, **hub_kwargs)
    except Exception as e:  # network, offline mode, unknown repo...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if offline else ""
        raise CheckpointError(f"cannot find {path!r} locally or on the Hugging Face hub{hint}: {e}") from None
    check_folder_files(folder, [p for p in patterns if "*" not in p])
    return folder
