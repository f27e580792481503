"""`BlenderbotConfig`: the architecture of a Blenderbot model, read from and written to HF `config.json`.

Fields and defaults are those of the reference (transformers' BlenderbotConfig). Keys this class does not
know (legacy generation fields, `architectures`, `transformers_version`, ...) are kept in `extra` and
written back unchanged, so a config.json survives a round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text
from .validation import check_field_types, check_limit, short


def read_json_settings(path: str | os.PathLike, from_dict):
    """`from_dict(data)` of a JSON settings file (config.json, generation_config.json); a missing, unreadable
    or invalid file is a one-line ConfigError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path} is not usable JSON: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

CONFIG_NAME = "config.json"
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "tanh")


@dataclass
class BlenderbotConfig:
    vocab_size: int = 8008
    max_position_embeddings: int = 128
    encoder_layers: int = 2
    encoder_ffn_dim: int = 10240
    encoder_attention_heads: int = 32
    decoder_layers: int = 24
    decoder_ffn_dim: int = 10240
    decoder_attention_heads: int = 32
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    use_cache: bool = True
    is_encoder_decoder: bool = True
    activation_function: str = "gelu"
    d_model: int = 2560
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    decoder_start_token_id: int = 1
    scale_embedding: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    encoder_no_repeat_ngram_size: int = 3
    forced_eos_token_id: int | None = 2
    # PretrainedConfig fields the reference models read
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    use_return_dict: bool = True
    model_type: str = "blenderbot"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a working model.

        Types are strict (a JSON bool for a bool, an integer for an int) and sizes are checked against
        `validation.LIMITS` before anything is allocated.
        """
        check_field_types(self, "config field")
        ints = {
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "d_model": self.d_model,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "encoder_attention_heads": self.encoder_attention_heads,
            "decoder_attention_heads": self.decoder_attention_heads,
        }
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {short(value)}")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config field {name!r} must be a non-negative integer, got {short(value)}")
        for name in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads"):
            check_limit(name, getattr(self, name))
        check_limit("parameters", self.parameter_estimate(), what="the model's size, estimated from the config,")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ConfigError(
                    f"config field 'd_model' ({self.d_model}) must be divisible by {heads!r} "
                    f"({getattr(self, heads)})"
                )
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"config field {name!r} must be a probability in [0, 1), got {short(value)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            if value is None and name in ("forced_eos_token_id", "bos_token_id"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"config field {name!r} must be a token id in [0, vocab_size={self.vocab_size}), got {short(value)}"
                )
        if self.encoder_no_repeat_ngram_size < 0:
            raise ConfigError("config field 'encoder_no_repeat_ngram_size' must be >= 0, "
                              f"got {self.encoder_no_repeat_ngram_size}")
        check_limit("encoder_no_repeat_ngram_size", self.encoder_no_repeat_ngram_size)
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"config field 'activation_function' is {short(self.activation_function)}; "
                f"known activations: {', '.join(ACTIVATIONS)}"
            )

    def parameter_estimate(self) -> int:
        """Parameters of the seq2seq model (biases and norms left out): for the size limit, before allocation."""
        d = self.d_model
        embeddings = self.vocab_size * d + 2 * self.max_position_embeddings * d
        encoder = self.encoder_layers * (4 * d * d + 2 * d * self.encoder_ffn_dim)
        decoder = self.decoder_layers * (8 * d * d + 2 * d * self.decoder_ffn_dim)
        return embeddings + encoder + decoder

    # the reference's generic names (transformers' attribute_map and num_hidden_layers), read only
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.encoder_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers

    # ------------------------------------------------------------------ dict / json
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides) -> BlenderbotConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = {**data, **overrides}
        if "model_type" in data and data["model_type"] not in ("blenderbot",):
            raise ConfigError(
                f"config field 'model_type' is {short(data['model_type'])}; this package implements 'blenderbot' "
                "(BlenderbotSmall, model_type 'blenderbot-small', is a different architecture)"
            )
        known = set(cls.field_names())
        # `return_dict` is the reference's name for what the models read as use_return_dict
        if "return_dict" in data and "use_return_dict" not in data:
            data["use_return_dict"] = data["return_dict"]
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"malformed config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names()}
        out.pop("use_return_dict")
        out.update(self.extra)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BlenderbotConfig:
        return read_json_settings(path, cls.from_dict)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> BlenderbotConfig:
        """Read config.json from a folder, a file path, a preset name or a hub id.

        Keyword arguments are hub options (`revision`, `cache_dir`, ...) or config fields to override;
        any other name raises ConfigError.
        """
        from . import hub, presets

        path = os.fspath(name_or_path)
        if path in presets.PRESETS and not os.path.exists(path):
            return cls.from_preset(path, **kwargs)
        if os.path.isfile(path):
            config = cls.from_json_file(path)
        else:
            folder = hub.resolve_folder(path, **hub.pop_hub_kwargs(kwargs))
            if not os.path.exists(os.path.join(folder, CONFIG_NAME)) and \
                    os.path.exists(os.path.join(folder, "adapter_config.json")):
                raise ConfigError(f"{folder} holds LoRA adapters (adapter_config.json), not a model: merge them into "
                                  "their base with `blenderbot-mb merge-lora` (or use the run's merged/ folder, "
                                  "written with --merge)")
            if not os.path.exists(os.path.join(folder, CONFIG_NAME)):
                inside = [n for n in ("model", "merged") if os.path.exists(os.path.join(folder, n, CONFIG_NAME))]
                if inside:  # a training run's folder: its model is a folder inside it
                    raise ConfigError(f"{folder} is a training run's folder, not a model: its model is "
                                      f"{os.path.join(folder, inside[-1])}")
            config = cls.from_json_file(os.path.join(folder, CONFIG_NAME))
        unknown = sorted(set(kwargs) - set(cls.field_names()) - {"return_dict"})
        if unknown:  # never stored into config.json
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; fields: {', '.join(cls.field_names())}")
        return config.replace(**kwargs) if kwargs else config

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BlenderbotConfig:
        from .presets import PRESETS

        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[key]["config"], **overrides)

    def replace(self, **changes) -> BlenderbotConfig:
        """A copy with some fields changed (unknown names go to `extra`), validated."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def __eq__(self, other):
        return isinstance(other, BlenderbotConfig) and self.to_dict() == other.to_dict()


def as_config(value, what: str = "config") -> BlenderbotConfig:
    """A model's config: ours as it is; a transformers BlenderbotConfig (anything with `to_dict()` and
    model_type 'blenderbot') converted from its fields; anything else is a ConfigError naming its class."""
    if isinstance(value, BlenderbotConfig):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and getattr(value, "model_type", None) == "blenderbot":
        return BlenderbotConfig.from_dict(to_dict())
    kind = type(value)
    raise ConfigError(f"{what} must be a BlenderbotConfig (this package's or transformers'), got "
                      f"{kind.__module__}.{kind.__qualname__}")
