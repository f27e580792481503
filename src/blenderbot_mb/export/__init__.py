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

import os

from ..errors import InputError

EXPORT_FORMATS = ("onnx", "savedmodel", "ctranslate2")


def export_model(src: str | os.PathLike, dst: str | os.PathLike, to: str, allow_pickle: bool = False,
                 force: bool = False, **options) -> str:
    """Export the model at `src` (a folder or hub id) as format `to` into the folder `dst`. Returns dst.

    dst must not exist or be empty unless `force`; the export is written into a temporary folder beside it
    and swapped in only when complete (`fileio.folder_transaction`), so a failed export leaves nothing
    behind and an old dst as it was. `options` go to the format's exporter (ctranslate2: `quantization`,
    the variants to write, default ("float32", "int8")).
    """
    if to not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {to!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    takes = {"onnx": ("opset",), "savedmodel": ("generation",), "ctranslate2": ("quantization",)}[to]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InputError(f"export to {to} takes {' or '.join(takes)}, not {', '.join(unknown)}")
    if isinstance(options.get("quantization"), str):
        options["quantization"] = (options["quantization"],)  # one variant given by its name
    from ..convert import DEFAULT_ARCHITECTURE, check_destination, copy_tokenizer_files, read_folder_config
    from ..errors import ConfigError
    from ..fileio import folder_transaction

    check_destination(os.fspath(dst), force, os.fspath(src))
    folder, config, arch = read_folder_config(os.fspath(src), allow_pickle)  # checked before any framework loads
    if arch != DEFAULT_ARCHITECTURE:
        raise ConfigError(f"{src} is a {arch}; --to {to} exports a {DEFAULT_ARCHITECTURE} (encoder, decoder and "
                          "LM head), the model a reply is generated with")
    with folder_transaction(dst, refuse_non_empty=not force) as tmp:
        if to == "onnx":
            from .onnx import export_folder
        elif to == "savedmodel":
            from .savedmodel import export_folder
        else:
            from .ctranslate2 import export_folder
        export_folder(folder, tmp, allow_pickle=allow_pickle, **options)
        copy_tokenizer_files(folder, tmp)
    return os.fspath(dst)


def save_configs(src_folder: str, dst_folder: str, generation: dict | None = None, **config_fields) -> None:
    """config.json (architectures set, and `config_fields` added) and generation_config.json of the source
    model (with `generation`'s settings applied), into dst_folder. The special token ids a
    generation_config.json leaves out are filled in from the model config, as other runtimes read only the
    generation file when there is one."""
    from ..config import BlenderbotConfig
    from ..generation_config import GenerationConfig

    config = BlenderbotConfig.from_pretrained(src_folder)
    config.replace(architectures=["BlenderbotForConditionalGeneration"], **config_fields).save_pretrained(dst_folder)
    settings = generation or {}
    generation = GenerationConfig.from_pretrained(src_folder, config)
    generation = generation.update(**settings) if settings else generation
    # the ids generate() itself fills in from the model config (GenerationConfig.resolve); forced_eos_token_id
    # is not one of them: a generation_config.json without it generates without it
    tokens = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    generation.update(**{k: getattr(config, k) for k in tokens if getattr(generation, k) is None}
                      ).save_pretrained(dst_folder)
