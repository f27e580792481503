"""Blenderbot in PyTorch: pre-LayerNorm encoder-decoder Transformer with Hugging Face's module names.

Read top to bottom: activations and masks, attention, the two layer types, encoder, decoder, and the
public classes. Module attribute names equal Hugging Face's, so `state_dict()` names are
`blenderbot_mb.naming.tensor_names(config, arch)` (plus the tied embedding aliases).

Key/value caches: one `KVCache` object, updated by the attention layers through `KVCache.update`. The public
`forward` takes and returns the reference's per-layer tuples `(self_k, self_v[, cross_k, cross_v])`, each
`[batch, heads, time, head_dim]`, grown by concatenation; `generate()` passes a `KVCache` preallocated to
`max_length` positions, written at the step's index, so nothing is reallocated while decoding.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import validation
from ..checkpoint import load_pretrained, save_pretrained
from ..config import BlenderbotConfig, as_config
from ..errors import ConfigError, InputError, check_sequence_length
from ..generation_config import GenerationConfig, GenerationConfigAttribute
from ..naming import tensor_names, tied_aliases
from ..outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    as_encoder_outputs,
)
from ..training import IGNORE_INDEX, loss_dtype
from ..vocab_resize import resize_vocab_tensor, resized_vocab_size, vocab_tensor_names
from .generation import GenerationMixin


def _gelu_fast(x):
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as the reference
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": _gelu_fast,
    "tanh": torch.tanh,
}


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: prepend the start token, drop the last token, turn -100 into pad."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, not called at all in eval (a dispatch less per call, which decoding feels)."""
    return F.dropout(x, p, training) if training and p > 0.0 else x


def padding_mask(mask: torch.Tensor, dtype: torch.dtype, query_len: int) -> torch.Tensor:
    """[batch, keys] 1/0 mask -> additive [batch, 1, query_len, keys] (0 or the dtype's most negative value)."""
    blocked = (mask[:, None, None, :] == 0).expand(-1, 1, query_len, -1)
    return torch.zeros(blocked.shape, dtype=dtype, device=mask.device).masked_fill(blocked, torch.finfo(dtype).min)


def causal_mask(batch: int, query_len: int, past_len: int, dtype, device, mask=None) -> torch.Tensor:
    """Additive [batch, 1, query_len, past_len + query_len] mask: no attention to later positions or padding."""
    keys = past_len + query_len
    later = torch.arange(keys, device=device)[None, :] > torch.arange(past_len, keys, device=device)[:, None]
    blocked = later[None, None].expand(batch, 1, query_len, keys)
    if mask is not None:
        blocked = blocked | (mask[:, None, None, :keys] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class KVCache:
    """The decoder's keys/values, one `update()` for every caller. Per layer: self-attention k/v [rows, heads,
    time, head_dim] and the cross-attention k/v of the encoder states (projected once, then reused).

    Two storages behind the same update: growing (the reference's `past_key_values` tuples, concatenated a
    step at a time), or preallocated to `max_length` positions (`generate()`: `buffers` [layers, 2, rows, heads,
    max_length, head_dim], or a list of per-layer [2, rows, heads, max_length, head_dim] tensors, written at
    `index`, the step's first position: a Python int, and the written positions are attended, or a device
    tensor [1] that a CUDA graph reads, and the whole buffer is attended, masked beyond the written positions).
    torch.compile writes in place only into tensors it gets whole, so compiled steps take the per-layer list.
    """

    def __init__(self, layers: int, self_kv=None, cross_kv=None, buffers=None, index=0, table=None):
        self.self_kv = list(self_kv) if self_kv is not None else [None] * layers
        self.cross_kv = list(cross_kv) if cross_kv is not None else [None] * layers
        self.buffers, self.index = buffers, index
        self.table = table  # [rows, max_length] or None: the cache row each position is read from (see reorder)
        self.preallocated = buffers is not None
        self.written = 0  # preallocated: positions written so far (a host int, for reorder)
        # per layer the (k, v) views of the buffers, taken once: reorder() writes into them in place
        self.views = [(buffers[i][0], buffers[i][1]) for i in range(layers)] if buffers is not None else None

    @classmethod
    def from_legacy(cls, past, layers: int) -> KVCache:
        """From the reference's per-layer tuples (self_k, self_v[, cross_k, cross_v])."""
        if past is None:
            return cls(layers)
        if len(past) != layers:
            raise InputError(f"past_key_values holds {len(past)} layers, the decoder has {layers}")
        return cls(layers, self_kv=[tuple(p[:2]) for p in past],
                   cross_kv=[tuple(p[2:4]) if len(p) == 4 else None for p in past])

    def to_legacy(self) -> tuple:
        return tuple(None if s is None else tuple(s) + (tuple(c) if c is not None else ())
                     for s, c in zip(self.self_kv, self.cross_kv, strict=True))

    def past_length(self):
        """Positions already cached: the write index, or the length of the grown keys."""
        if self.preallocated:
            return self.index
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def update(self, layer: int, k, v, positions):
        """Store this call's self-attention k/v [rows, heads, new, head_dim] at the write index (a device index:
        at `positions` [new]); return the keys/values to attend to."""
        if self.preallocated:
            if torch.is_tensor(self.index):  # a device index (CUDA graphs): the whole buffer, masked
                kv = self.buffers[layer]  # [2, rows, heads, max_length, head_dim], written whole (torch.compile)
                kv.index_copy_(3, positions, torch.stack([k, v]))
                return kv[0], kv[1]
            k_buf, v_buf = self.views[layer]
            end = self.index + k.shape[2]
            k_buf[:, :, self.index:end] = k
            v_buf[:, :, self.index:end] = v
            return k_buf[:, :, :end], v_buf[:, :, :end]
        if self.self_kv[layer] is not None:
            k = torch.cat([self.self_kv[layer][0], k], dim=2)
            v = torch.cat([self.self_kv[layer][1], v], dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def reorder(self, rows) -> None:
        """Beam search: row i takes the keys/values of row `rows[i]` (the written positions), in place; with a
        `table` (read by kernels.attention), row i takes row `rows[i]`'s table instead, and the buffers stay."""
        if self.table is not None:
            self.table.copy_(self.table.index_select(0, rows))
            return
        for buffers in [self.buffers] if torch.is_tensor(self.buffers) else self.buffers:
            written = buffers[..., :self.written, :]
            written.copy_(written.index_select(-4, rows))


class BlenderbotAttention(nn.Module):
    """Multi-head attention: self-attention, or (`is_cross_attention`) attention to the encoder states."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, is_decoder: bool = False,
                 bias: bool = True, is_cross_attention: bool = False):
        super().__init__()
        self.is_cross_attention = is_cross_attention
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ConfigError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.scaling = self.head_dim**-0.5
        self.is_decoder = is_decoder
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, Dh]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(states)), self.split_heads(self.v_proj(states))

    def forward(self, hidden_states, key_value_states=None, cache: KVCache | None = None, layer: int = 0,
                positions=None, attention_mask=None, layer_head_mask=None, output_attentions=False, causal=False):
        """Returns (output, attention weights or None). With a `cache`, self-attention stores its keys/values
        at `positions` through `cache.update`, cross-attention projects the encoder states once per cache.
        `causal` (no `attention_mask`, queries and keys the same positions): each query attends to the keys up
        to its own position, without a mask tensor (SDPA's flash kernels)."""
        q = self.split_heads(self.q_proj(hidden_states))
        if not self.is_cross_attention:
            k, v = self.project_kv(hidden_states)
            if cache is not None:
                k, v = cache.update(layer, k, v, positions)
        elif cache is not None:  # projected from the encoder states on first use, then reused
            if cache.cross_kv[layer] is None:
                cache.cross_kv[layer] = self.project_kv(key_value_states)
            k, v = cache.cross_kv[layer]
        else:
            k, v = self.project_kv(key_value_states)
        dropout = self.dropout if self.training else 0.0
        if output_attentions or layer_head_mask is not None:
            scores = (q * self.scaling) @ k.transpose(-1, -2)
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = F.softmax(scores, dim=-1)
            if layer_head_mask is not None:
                weights = weights * layer_head_mask.view(1, -1, 1, 1)
            out = _dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                                                 is_causal=causal)
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], self.embed_dim)
        return self.out_proj(out), weights


class BlenderbotEncoderLayer(nn.Module):
    """x + SelfAttn(LN(x)), then x + FC2(act(FC1(LN(x))))."""

    def __init__(self, config: BlenderbotConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = BlenderbotAttention(d, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation_fn = ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, hidden_states, attention_mask=None, layer_head_mask=None, output_attentions=False):
        h, weights = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask,
                                    layer_head_mask=layer_head_mask, output_attentions=output_attentions)
        hidden_states = hidden_states + _dropout(h, self.dropout, self.training)
        h = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        h = self.fc2(_dropout(h, self.activation_dropout, self.training))
        hidden_states = hidden_states + _dropout(h, self.dropout, self.training)
        if hidden_states.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            limit = torch.finfo(torch.float16).max - 1000
            hidden_states = hidden_states.clamp(-limit, limit)
        return hidden_states, weights


class BlenderbotDecoderLayer(nn.Module):
    """x + SelfAttn(LN(x)), x + CrossAttn(LN(x), encoder), x + FC2(act(FC1(LN(x))))."""

    def __init__(self, config: BlenderbotConfig):
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = BlenderbotAttention(d, heads, config.attention_dropout, is_decoder=True)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = BlenderbotAttention(d, heads, config.attention_dropout, is_decoder=True,
                                                is_cross_attention=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation_fn = ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                layer_head_mask=None, cross_attn_layer_head_mask=None, cache: KVCache | None = None, layer: int = 0,
                positions=None, output_attentions=False, causal=False):
        """Returns (hidden_states, self-attention weights, cross-attention weights); keys/values go to `cache`.
        Cross-attention runs when there are encoder states or the cache holds this layer's cross keys/values.
        `causal`: self-attention is causal without a mask tensor (see BlenderbotAttention)."""
        h, self_weights = self.self_attn(
            self.self_attn_layer_norm(hidden_states), cache=cache, layer=layer, positions=positions,
            attention_mask=attention_mask, layer_head_mask=layer_head_mask, output_attentions=output_attentions,
            causal=causal)
        hidden_states = hidden_states + _dropout(h, self.dropout, self.training)
        cross_weights = None
        if encoder_hidden_states is not None or (cache is not None and cache.cross_kv[layer] is not None):
            h, cross_weights = self.encoder_attn(
                self.encoder_attn_layer_norm(hidden_states), key_value_states=encoder_hidden_states, cache=cache,
                layer=layer, attention_mask=encoder_attention_mask, layer_head_mask=cross_attn_layer_head_mask,
                output_attentions=output_attentions)
            hidden_states = hidden_states + _dropout(h, self.dropout, self.training)
        h = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        h = self.fc2(_dropout(h, self.activation_dropout, self.training))
        hidden_states = hidden_states + _dropout(h, self.dropout, self.training)
        return hidden_states, self_weights, cross_weights


def _check_ids(ids: torch.Tensor | None, config, what: str, values: bool = True) -> None:
    if ids is not None:
        validation.check_input_ids(ids, config.vocab_size, config.max_position_embeddings, what, values=values)


def _check_mask(mask: torch.Tensor | None, shape, what: str, values: bool = True) -> None:
    validation.check_attention_mask(mask, shape, what, values=values)


def check_values(model: nn.Module, enabled: bool) -> None:
    """Whether `forward` checks the values of ids and masks (vocabulary range, 0/1 masks) or only their shapes
    and dtypes. Reading values on a GPU waits for it; a training loop that checks its batches on the host
    turns this off."""
    for module in model.modules():
        if isinstance(module, BlenderbotPreTrainedModel):
            module.check_values = enabled


def _layer_dropped(module: nn.Module, layerdrop: float) -> bool:
    return module.training and layerdrop > 0.0 and torch.rand([]).item() < layerdrop


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
                   "xavier_normal_")
_init_lock = threading.Lock()


@contextlib.contextmanager
def _on_meta_without_init():
    """Modules built on the meta device, for weights about to be assigned from a checkpoint, without
    torch.nn's random initializations of their meta tensors: the first random fill of a meta tensor imports
    torch._dynamo (1-2 s of every from_pretrained otherwise). Tensors on other devices, in any thread, are
    initialized as always."""

    def meta_skipped(original):
        def init(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)
        return init

    with _init_lock:
        originals = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name, original in originals.items():
                setattr(nn.init, name, meta_skipped(original))
            with torch.device("meta"):
                yield
        finally:
            for name, original in originals.items():
                setattr(nn.init, name, original)


def _torch_dtype(dtype):
    """from_pretrained's dtype: None -> float32, "auto" kept, a name ("bfloat16", "torch.float16") -> the dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch dtype, its name or 'auto', got {dtype!r}")
    return dtype


class BlenderbotPreTrainedModel(nn.Module):
    """Weight init, loading and saving in Hugging Face layout; shared by the three public classes."""

    architecture = "BlenderbotModel"
    check_values = True  # see check_values()
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    gradient_checkpointing = False  # set on the encoder and decoder by gradient_checkpointing_enable()

    def __init__(self, config: BlenderbotConfig):
        super().__init__()
        self.config = config = as_config(config)

    # ------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Point the tied copies (encoder/decoder embed_tokens, lm_head) at the canonical embedding."""

    generation_config = GenerationConfigAttribute()  # a transformers GenerationConfig assigned here is converted

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied ones once); `only_trainable`: those that require grad;
        `exclude_embeddings`: without the token and position embeddings (transformers' arguments)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        unique = {id(p): p for p in self.parameters()}
        return sum(p.numel() for key, p in unique.items()
                   if key not in embeddings and (p.requires_grad or not only_trainable))

    @classmethod
    def can_generate(cls) -> bool:
        return issubclass(cls, GenerationMixin)

    # ------------------------------------------------------------------ memory for training
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """While training, recompute each layer's activations in the backward pass instead of keeping them
        (less memory, about a third more time), as transformers does: `gradient_checkpointing_kwargs` go to
        `torch.utils.checkpoint.checkpoint` (default `use_reentrant=False`; with `use_reentrant=True` call
        `enable_input_require_grads()` when the embeddings are frozen); `every_n_layers`: only every n-th layer
        of the encoder and of the decoder; `offload`: what the checkpoints keep waits in (pinned) CPU memory.
        The decoder then keeps no cache."""
        if not (isinstance(every_n_layers, int) and every_n_layers >= 1):
            raise InputError(f"every_n_layers must be an integer >= 1, got {every_n_layers!r}")
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, (BlenderbotEncoder, BlenderbotDecoder)):
                module.gradient_checkpointing = True
                module.checkpoint_options, module.checkpoint_every, module.checkpoint_offload = (
                    options, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, (BlenderbotEncoder, BlenderbotDecoder)):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules()
                   if isinstance(m, (BlenderbotEncoder, BlenderbotDecoder)))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' newer name for `gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """The input embeddings' output requires grad even when the embeddings are frozen (adapters with
        reentrant gradient checkpointing need it), as transformers does."""
        def require_grad(module, inputs, output):
            output.requires_grad_(True)

        self._input_grads_hook = self.get_input_embeddings().register_forward_hook(require_grad)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_input_grads_hook", None)
        if hook is not None:
            hook.remove()

    def _layer(self, module, hidden, tensors: dict | None = None, /, index: int = 0, **kwargs):
        """`module(hidden, **tensors, **kwargs)` (a layer), recomputed in the backward pass under gradient checkpointing.
        The tensors that need gradients (the hidden states, the encoder's output in `tensors`) go to the
        checkpoint positionally, as reentrant checkpointing requires."""
        names = list(tensors or {})

        def call(h, *values):
            return module(h, **dict(zip(names, values, strict=True)), **kwargs)

        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and index % self.checkpoint_every == 0):
            return call(hidden, *(tensors or {}).values())
        from torch.utils.checkpoint import checkpoint

        kept = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if self.checkpoint_offload
                else contextlib.nullcontext())
        with kept:
            return checkpoint(call, hidden, *(tensors[n] for n in names), **self.checkpoint_options)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Give the vocabulary `new_num_tokens` entries (rounded up to `pad_to_multiple_of`); returns the
        input embedding. The shared embedding, an untied `lm_head`, `final_logits_bias` and
        `config.vocab_size` change together; the rule for new rows is `blenderbot_mb.vocab_resize`'s."""
        size = resized_vocab_size(self.config, new_num_tokens, pad_to_multiple_of)
        if size != self.config.vocab_size:
            for name in vocab_tensor_names(self.config, self.architecture):
                owner, _, leaf = name.rpartition(".")
                module = self.get_submodule(owner)
                old = getattr(module, leaf)
                new = resize_vocab_tensor(name, old.detach().float().cpu().numpy(), size, self.config.init_std,
                                          mean_resizing)
                new = torch.from_numpy(new).to(device=old.device, dtype=old.dtype)
                setattr(module, leaf, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
            self.config.vocab_size = size  # in place: every submodule holds this config
            self.tie_weights()
            for module in (self.get_input_embeddings(), getattr(self, "lm_head", None)):
                if isinstance(module, nn.Embedding):
                    module.num_embeddings = size
                elif isinstance(module, nn.Linear):
                    module.out_features = size
        return self.get_input_embeddings()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path, config: BlenderbotConfig | None = None, dtype=None, device=None,
                        allow_pickle: bool = False, torch_dtype=None, **kwargs):
        """Load a folder or hub id saved by us or by Hugging Face (safetensors; pickle only on request).

        `dtype` (or its older name `torch_dtype`): None (float32), "auto" (the file's dtype), a torch dtype
        or its name. Other keyword arguments are hub options, config fields to override (e.g.
        `add_cross_attention=False`) or generation settings; unsupported transformers options such as
        `device_map=` raise ConfigError naming the argument.
        """
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype=")
        dtype = _torch_dtype(dtype if dtype is not None else torch_dtype)
        config, weights, generation_config = load_pretrained(name_or_path, cls.architecture, "pt", config,
                                                             allow_pickle, **kwargs)
        with _on_meta_without_init():
            model = cls(config)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        missing = set(missing) - set(tied_aliases(config, cls.architecture))
        if missing or unexpected:  # read_weights already checked names; this guards the module tree
            raise ConfigError(f"model/checkpoint mismatch: missing {sorted(missing)}, unexpected {unexpected}")
        model.tie_weights()
        if dtype != "auto":
            model.to(dtype)
        if device is not None:
            model.to(device)
        if isinstance(model, GenerationMixin):
            model.generation_config = generation_config
        return model.eval()

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: canonical names only, tied copies left out."""
        names = tensor_names(self.config, self.architecture)
        state = self.state_dict()
        return {n: state[n].detach().contiguous() for n in names}

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """config.json, generation_config.json and model.safetensors (sharded above `max_shard_size`); with
        `safe_serialization=False`, a `pytorch_model.bin` pickle instead (reading it back needs allow_pickle)."""
        save_pretrained(os.fspath(save_directory), self.config, self.canonical_state_dict(), framework="pt",
                        generation_config=getattr(self, "generation_config", None), max_shard_size=max_shard_size,
                        architecture=self.architecture, weights_format="safetensors" if safe_serialization else "pt")


class BlenderbotEncoder(BlenderbotPreTrainedModel):
    def __init__(self, config: BlenderbotConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BlenderbotEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        device = self.embed_positions.weight.device
        input_ids, attention_mask = (_as_tensor(input_ids, device, "input_ids"),
                                     _as_tensor(attention_mask, device, "attention_mask"))
        _check_ids(input_ids, cfg, "input_ids", self.check_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        batch, length = inputs_embeds.shape[:2]
        check_sequence_length(length, cfg.max_position_embeddings, "input_ids")
        _check_mask(attention_mask, (batch, length), "attention_mask", self.check_values)
        _check_head_mask(head_mask, len(self.layers), "head_mask")
        h = inputs_embeds + self.embed_positions.weight[:length]
        h = _dropout(h, cfg.dropout, self.training)
        mask = padding_mask(attention_mask, h.dtype, length) if attention_mask is not None else None
        states, attentions = [], []
        for i, layer in enumerate(self.layers):
            states.append(h)
            if _layer_dropped(self, cfg.encoder_layerdrop):
                attentions.append(None)
                continue
            h, weights = self._layer(layer, h, index=i, attention_mask=mask, output_attentions=output_attentions,
                                     layer_head_mask=None if head_mask is None else head_mask[i])
            attentions.append(weights)
        h = self.layer_norm(h)
        out = BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) + (h,) if output_hidden_states else None,
                              attentions=tuple(attentions) if output_attentions else None)
        return out if _return_dict(cfg, return_dict) else out.to_tuple()


class BlenderbotDecoder(BlenderbotPreTrainedModel):
    def __init__(self, config: BlenderbotConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens or nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BlenderbotDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                head_mask=None, cross_attn_head_mask=None, past_key_values=None, inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        """`past_key_values`: the reference's per-layer tuples (returned the same way), or a `KVCache`
        (updated in place and returned; `generate()` passes a preallocated one)."""
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and self.gradient_checkpointing and self.training and past_key_values is None:
            use_cache = False  # a layer recomputed in the backward pass would write its keys twice
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of decoder_input_ids and decoder_inputs_embeds")
        device = self.embed_positions.weight.device
        input_ids, attention_mask = (_as_tensor(input_ids, device, "decoder_input_ids"),
                                     _as_tensor(attention_mask, device, "decoder_attention_mask"))
        encoder_attention_mask = _as_tensor(encoder_attention_mask, device, "attention_mask")
        legacy = not isinstance(past_key_values, KVCache)
        cache = KVCache.from_legacy(past_key_values, len(self.layers)) if legacy else past_key_values
        if legacy and past_key_values is None and not use_cache:
            cache = None
        past_len = cache.past_length() if cache is not None else 0
        preallocated = cache is not None and cache.preallocated  # generate()'s cache
        if inputs_embeds is None:
            if not preallocated:  # generate() checked its ids once
                _check_ids(input_ids, cfg, "decoder_input_ids", self.check_values)
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        causal = False
        if preallocated and torch.is_tensor(past_len):
            # a device index (CUDA graphs): positions without a host sync, the whole buffer attended, masked
            positions = torch.arange(length, device=device) + past_len
            later = torch.arange(cache.buffers[0].shape[-2], device=device)[None, :] > positions[:, None]
            self_mask = torch.zeros(later.shape, dtype=inputs_embeds.dtype, device=device).masked_fill(
                later, torch.finfo(inputs_embeds.dtype).min)[None, None]
            h = inputs_embeds + self.embed_positions(positions)
        elif preallocated:  # a host index: the written positions only
            positions = None
            self_mask = None if length == 1 else causal_mask(
                batch=batch, query_len=length, past_len=past_len, dtype=inputs_embeds.dtype, device=device)
            h = inputs_embeds + self.embed_positions.weight[past_len:past_len + length]
        else:
            check_sequence_length(past_len + length, cfg.max_position_embeddings,
                                  "decoder_input_ids (with the cached positions)" if past_len else "decoder_input_ids")
            _check_mask(attention_mask, (batch, past_len + length), "decoder_attention_mask", self.check_values)
            if encoder_hidden_states is not None:
                validation.check_batch_rows(batch, encoder_hidden_states.shape[0])
                _check_mask(encoder_attention_mask, encoder_hidden_states.shape[:2], "encoder attention_mask",
                            self.check_values)
            _check_head_mask(head_mask, len(self.layers), "decoder_head_mask")
            _check_head_mask(cross_attn_head_mask, len(self.layers), "cross_attn_head_mask")
            positions = None  # a growing cache appends; no write positions
            h = inputs_embeds + self.embed_positions.weight[past_len:past_len + length]  # past_len may be traced
            self_mask = None  # one new query sees every cached key
            # nothing cached, no padding mask and SDPA in every layer: SDPA's own causal masking, no mask tensor
            # (not while tracing, as the ONNX export does: the traced length is a tensor, and the graph must
            # take any length)
            causal = (not torch.jit.is_tracing() and length > 1 and attention_mask is None
                      and isinstance(past_len, int) and past_len == 0 and head_mask is None and not output_attentions)
            if (length > 1 or attention_mask is not None) and not causal:
                self_mask = causal_mask(batch=batch, query_len=length, past_len=past_len, dtype=inputs_embeds.dtype,
                                        device=device, mask=attention_mask)
        h = _dropout(h, cfg.dropout, self.training)
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = padding_mask(encoder_attention_mask, h.dtype, length)
        states, self_attns, cross_attns = [], [], []
        for i, layer in enumerate(self.layers):
            states.append(h)
            if _layer_dropped(self, cfg.decoder_layerdrop):
                self_attns.append(None), cross_attns.append(None)
                continue
            h, self_w, cross_w = self._layer(
                layer, h, {"encoder_hidden_states": encoder_hidden_states}, index=i, attention_mask=self_mask,
                encoder_attention_mask=cross_mask, layer_head_mask=None if head_mask is None else head_mask[i],
                cross_attn_layer_head_mask=None if cross_attn_head_mask is None else cross_attn_head_mask[i],
                cache=cache, layer=i, positions=positions, output_attentions=output_attentions, causal=causal)
            self_attns.append(self_w), cross_attns.append(cross_w)
        h = self.layer_norm(h)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=h,
            past_key_values=(cache.to_legacy() if legacy else cache) if use_cache and cache is not None else None,
            hidden_states=tuple(states) + (h,) if output_hidden_states else None,
            attentions=tuple(self_attns) if output_attentions else None,
            cross_attentions=tuple(cross_attns) if output_attentions and (
                encoder_hidden_states is not None or any(w is not None for w in cross_attns)) else None,
        )  # (the cross-attention's weights also where the cache holds its keys and values: generate())
        return out if _return_dict(cfg, return_dict) else out.to_tuple()


def _as_tensor(x, device, what: str):
    """numpy arrays and nested lists of ids or mask values as tensors (the tf and flax classes take them too);
    tensors and None as they are."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(validation.host_array(x, what), device=device)


def _return_dict(config, return_dict) -> bool:
    return config.use_return_dict if return_dict is None else return_dict


def _check_head_mask(mask, layers: int, what: str) -> None:
    if mask is not None and mask.shape[0] != layers:
        raise InputError(f"{what} must have one row per layer ({layers}), got shape {tuple(mask.shape)}")


class BlenderbotModel(BlenderbotPreTrainedModel):
    """The bare encoder-decoder: returns the decoder's last hidden state (no LM head)."""

    architecture = "BlenderbotModel"

    def __init__(self, config: BlenderbotConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = BlenderbotEncoder(config, self.shared)
        self.decoder = BlenderbotDecoder(config, self.shared)
        self.post_init()

    def tie_weights(self):
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.tie_weights()

    def get_encoder(self):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                                           inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states, return_dict=True)
        else:
            encoder_outputs = as_encoder_outputs(encoder_outputs)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise InputError("BlenderbotModel needs decoder_input_ids or decoder_inputs_embeds")
        dec = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                           encoder_hidden_states=encoder_outputs.last_hidden_state,
                           encoder_attention_mask=attention_mask, head_mask=decoder_head_mask,
                           cross_attn_head_mask=cross_attn_head_mask, past_key_values=past_key_values,
                           inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           return_dict=True)
        out = Seq2SeqModelOutput(
            last_hidden_state=dec.last_hidden_state, past_key_values=dec.past_key_values,
            decoder_hidden_states=dec.hidden_states, decoder_attentions=dec.attentions,
            cross_attentions=dec.cross_attentions, encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions)
        return out if _return_dict(self.config, return_dict) else out.to_tuple()


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int):
    """Mean token cross-entropy over the labels other than -100 (nan when none counts, as the reference);
    the labels were checked (`validation.check_labels`) before the forward pass."""
    if labels is None:
        return None
    dtype = getattr(torch, loss_dtype(str(logits.dtype)))
    return F.cross_entropy(logits.reshape(-1, vocab_size).to(dtype), labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX)


class BlenderbotForConditionalGeneration(BlenderbotPreTrainedModel, GenerationMixin):
    """Encoder-decoder with the tied LM head and `final_logits_bias`; `generate()` for replies."""

    architecture = "BlenderbotForConditionalGeneration"

    def __init__(self, config: BlenderbotConfig):
        super().__init__(config)
        self.model = BlenderbotModel(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        # self.model initialized itself; the LM head is tied to it (or initialized alone when untied)
        if not config.tie_word_embeddings and not self.lm_head.weight.is_meta:
            self._init_weights(self.lm_head)
        self.tie_weights()

    def tie_weights(self):
        self.model.tie_weights()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight

    def get_encoder(self):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    def get_input_embeddings(self):
        return self.model.shared

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)
        self.tie_weights()

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for `labels` (transformers' DataCollatorForSeq2Seq calls this)."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def prepare_inputs_for_generation(self, decoder_input_ids, past_key_values=None, attention_mask=None,
                                      head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None,
                                      use_cache=None, encoder_outputs=None, **kwargs) -> dict:
        """`forward` keyword arguments for one decoding step (the reference's hook, which peft wraps): with a
        cache only the newest decoder token is fed. `generate()` itself runs its own step."""
        if past_key_values is not None:  # feed what the cache does not hold yet (at least the newest token)
            cached = past_key_values[0][0].shape[2]
            decoder_input_ids = decoder_input_ids[:, min(cached, decoder_input_ids.shape[1] - 1):]
        return {"input_ids": None, "encoder_outputs": encoder_outputs, "past_key_values": past_key_values,
                "decoder_input_ids": decoder_input_ids, "attention_mask": attention_mask, "head_mask": head_mask,
                "decoder_head_mask": decoder_head_mask, "cross_attn_head_mask": cross_attn_head_mask,
                "use_cache": use_cache}

    def _lm_logits(self, hidden):
        return self.lm_head(hidden) + self.final_logits_bias[0].to(hidden.dtype)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        if labels is not None:
            use_cache = False
            labels = _as_tensor(labels, self.final_logits_bias.device, "labels")
            decoder_input_ids = _as_tensor(decoder_input_ids, self.final_logits_bias.device, "decoder_input_ids")
            decoder = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            validation.check_labels(labels, None if decoder is None else decoder.shape[:2], self.config.vocab_size,
                                    self.check_values, max_positions=self.config.max_position_embeddings)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask, head_mask=head_mask,
                         decoder_head_mask=decoder_head_mask, cross_attn_head_mask=cross_attn_head_mask,
                         encoder_outputs=encoder_outputs, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                         use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.lm_head(out.last_hidden_state) + self.final_logits_bias.to(out.last_hidden_state.dtype)
        result = Seq2SeqLMOutput(
            loss=_lm_loss(logits, labels, self.config.vocab_size), logits=logits,
            past_key_values=out.past_key_values, decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions, cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states, encoder_attentions=out.encoder_attentions)
        return result if _return_dict(self.config, return_dict) else result.to_tuple()


class BlenderbotDecoderWrapper(nn.Module):
    """Holds the decoder under `model.decoder`, the reference's names for the causal LM."""

    def __init__(self, config: BlenderbotConfig):
        super().__init__()
        self.decoder = BlenderbotDecoder(config)

    def forward(self, *args, **kwargs):
        return self.decoder(*args, **kwargs)


class BlenderbotForCausalLM(BlenderbotPreTrainedModel, GenerationMixin):
    """The decoder alone as a language model (optionally attending to given encoder states)."""

    architecture = "BlenderbotForCausalLM"

    def __init__(self, config: BlenderbotConfig):
        config = config.replace(is_decoder=True, is_encoder_decoder=False)
        super().__init__(config)
        self.model = BlenderbotDecoderWrapper(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.model.decoder.embed_tokens = value
        self.tie_weights()

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model.decoder

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=None,
                                      **kwargs) -> dict:
        """`forward` keyword arguments for one decoding step (the reference's hook): with a cache only the
        newest token is fed; the attention mask covers every position."""
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        if past_key_values is not None:
            cached = past_key_values[0][0].shape[2]
            input_ids = input_ids[:, min(cached, input_ids.shape[1] - 1):]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                "use_cache": use_cache}

    def _lm_logits(self, hidden):
        return self.lm_head(hidden)

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                head_mask=None, cross_attn_head_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        """Logits for every position; `labels[..., i]` is the target of `logits[..., i, :]` (not shifted)."""
        if labels is not None:
            labels = _as_tensor(labels, self.lm_head.weight.device, "labels")
            given = input_ids if input_ids is not None else inputs_embeds
            validation.check_labels(labels, None if given is None else given.shape[:2], self.config.vocab_size,
                                    self.check_values)
        out = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, head_mask=head_mask,
                                 cross_attn_head_mask=cross_attn_head_mask, past_key_values=past_key_values,
                                 inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        result = CausalLMOutputWithCrossAttentions(
            loss=_lm_loss(logits, labels, self.config.vocab_size), logits=logits,
            past_key_values=out.past_key_values, hidden_states=out.hidden_states, attentions=out.attentions,
            cross_attentions=out.cross_attentions)
        return result if _return_dict(self.config, return_dict) else result.to_tuple()
