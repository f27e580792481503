"""Exporting a model for other runtimes: ONNX (onnxruntime, optimum, transformers.js), TensorFlow
SavedModel (TF Serving), CTranslate2.

    >>> from blenderbot_mb.export import export_model
    >>> export_model("facebook/blenderbot-400M-distill", "bb-onnx", to="onnx")          # doctest: +SKIP
    >>> from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration
    >>> model = ORTBlenderbotForConditionalGeneration.from_pretrained("bb-onnx")       # doctest: +SKIP

Every export writes a new folder: the format's files, config.json, generation_config.json and the
tokenizer files of the source, so the folder is self-contained. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ..errors import CheckpointError, InputError

EXPORT_FORMATS = ("onnx", "savedmodel", "ctranslate2")
# the framework each exporter reads the model with
EXPORT_BACKENDS = {"onnx": "torch", "savedmodel": "tf", "ctranslate2": None}


def export_model(src: str | os.PathLike, dst: str | os.PathLike, to: str, allow_pickle: bool = False,
                 force: bool = False, **options) -> str:
    """Export the model at `src` (a folder or hub id) as format `to` into the folder `dst`. Returns dst.

    dst must not exist or be empty unless `force`; the export is written into a temporary folder beside it
    and moved in only when complete, so a failed export leaves nothing behind. `options` go to the format's
    exporter: `quantization` for ctranslate2 ("int8" adds an int8 copy; default both).
    """
    if to not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {to!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    from ..convert import copy_tokenizer_files, read_folder_config

    folder, config, _ = read_folder_config(os.fspath(src), allow_pickle)  # checked before any framework loads
    with staged_folder(dst, force) as tmp:
        if to == "onnx":
            from .onnx import export_folder
        elif to == "savedmodel":
            from .savedmodel import export_folder
        else:
            from .ctranslate2 import export_folder
        export_folder(folder, tmp, allow_pickle=allow_pickle, **options)
        copy_tokenizer_files(folder, tmp)
    return os.fspath(dst)


def save_configs(src_folder: str, dst_folder: str) -> None:
    """config.json (architectures set) and generation_config.json of the source model, into dst_folder.
    The special token ids a generation_config.json leaves out are filled in from the model config, as
    other runtimes read only the generation file when there is one."""
    from ..config import BlenderbotConfig
    from ..generation_config import GenerationConfig

    config = BlenderbotConfig.from_pretrained(src_folder)
    config.replace(architectures=["BlenderbotForConditionalGeneration"]).save_pretrained(dst_folder)
    generation = GenerationConfig.from_pretrained(src_folder, config)
    tokens = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id")
    generation.update(**{k: getattr(config, k) for k in tokens if getattr(generation, k) is None}
                      ).save_pretrained(dst_folder)


@contextlib.contextmanager
def staged_folder(dst: str | os.PathLike, force: bool = False):
    """Yield a temporary folder beside `dst` that becomes `dst` when the block succeeds (removed if not)."""
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise InputError(f"{dst} is a file, not a folder; pass a folder to export into")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise InputError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write into {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
