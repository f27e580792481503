"""The decoder step of `generate()`, one token per row over the preallocated cache, in three forms:

- the model's own decoder forward (the default),
- a fused step written for decoding (`fused=True`): one QKV projection per layer instead of three (the
  concatenated weights are copied from the model's tensors at the start of each generate call, so weights
  changed in place are seen, and nothing changes in the checkpoints), the new keys and values written
  into the cache with one copy, no per-step head reshapes, the masks built once per step rather than per
  layer;
- either one compiled with `torch.compile` (`compile=True` or a mode name; fullgraph, static shapes).

Every form reads the step index from a device tensor, so shapes never change while decoding: the compiled
step is traced once per shape and a CUDA graph can replay it (generation.CudaGraphStep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # modes with their own CUDA graphs would nest ours


@dataclass(frozen=True)
class DecodingOptions:
    """How generate() runs its decoder step: fused or the model's forward, compiled or not (`mode`,
    `backend`: torch.compile's)."""

    fused: bool = False
    compile: bool = False
    mode: str = "default"
    backend: str = "inductor"

    def __post_init__(self):
        if self.compile and self.backend == "inductor" and self.mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)} (generate() replays its own "
                              f"CUDA graph), got {self.mode!r}")

    def replace(self, fused=None, compile=None) -> DecodingOptions:
        """These options with generate()'s `fused=` / `compile=` (True, False or a mode name) applied."""
        mode = compile if isinstance(compile, str) else self.mode
        return DecodingOptions(fused=self.fused if fused is None else bool(fused),
                               compile=self.compile if compile is None else compile is not False,
                               mode=mode, backend=self.backend)


def decode_function(model, options: DecodingOptions):
    """`fn(tokens [rows], cache, encoder_mask [rows, S] or None, qkv) -> float32 logits [rows, vocab]`, made
    (and compiled) once per model and options; `qkv` is fused_qkv()'s weights (None unless fused)."""
    made = model.__dict__.setdefault("_decode_functions", {})
    if options not in made:
        fn = fused_logits if options.fused else plain_logits
        if options.compile:
            extra = {"mode": options.mode} if options.backend == "inductor" else {}
            fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=options.backend, **extra)
        made[options] = fn
    return made[options]


def cache_buffers(layers: int, shape, dtype, device, per_layer: bool):
    """The preallocated self-attention cache: one [layers, *shape] tensor, or (`per_layer`, for compiled steps,
    which write in place only into tensors they get whole) a list of `layers` [*shape] tensors."""
    if per_layer:
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    return torch.zeros(layers, *shape, dtype=dtype, device=device)


def plain_logits(model, tokens, cache, encoder_mask, qkv=None):
    """The model's own decoder forward for one token per row."""
    return model._next_logits(tokens, cache, encoder_mask)


def fused_qkv(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer the self-attention's q/k/v weights [3 * d, d] and biases [3 * d], concatenated into
    buffers the model keeps (a captured step reads them by address), refreshed from the model's tensors."""
    layers = model.get_decoder().layers
    attn = [layer.self_attn for layer in layers]
    kept = model.__dict__.get("_fused_qkv")
    like = attn[0].q_proj.weight
    if kept is None or kept[0][0].dtype != like.dtype or kept[0][0].device != like.device:
        d = attn[0].embed_dim
        kept = [(like.new_empty(3 * d, d), like.new_empty(3 * d)) for _ in layers]
        model.__dict__["_fused_qkv"] = kept
    with torch.no_grad():
        for (w, b), a in zip(kept, attn, strict=True):
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], out=w)
            torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], out=b)
    return kept


def _norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def fused_logits(model, tokens, cache, encoder_mask, qkv):
    """One decoder step written for decoding; the same arithmetic as the decoder's forward, in fewer kernels.
    cache: a KVCache with per-layer `buffers` [2, rows, heads, max_length, head_dim] and a device `index` [1]."""
    dec = model.get_decoder()
    rows, index = tokens.shape[0], cache.index
    _, _, heads, length, head_dim = cache.buffers[0].shape
    d = heads * head_dim
    h = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(index)  # [rows, d]
    lowest = torch.finfo(h.dtype).min
    later = torch.arange(length, device=h.device) > index  # [max_length]: not written yet
    self_bias = torch.zeros(later.shape, dtype=h.dtype, device=h.device).masked_fill(later, lowest)
    self_bias = self_bias[None, None, None]  # [1, 1, 1, max_length]
    cross_bias = None
    if encoder_mask is not None:  # [rows, 1, 1, S]
        cross_bias = torch.zeros(encoder_mask.shape, dtype=h.dtype, device=h.device).masked_fill(
            encoder_mask == 0, lowest)[:, None, None, :]
    for i, layer in enumerate(dec.layers):
        w, b = qkv[i]
        x = F.linear(_norm(layer.self_attn_layer_norm, h), w, b).view(rows, 3, heads, 1, head_dim)
        kv = cache.buffers[i]  # [2, rows, heads, max_length, head_dim]
        kv.index_copy_(3, index, x[:, 1:].transpose(0, 1))
        out = F.scaled_dot_product_attention(x[:, 0], kv[0], kv[1], attn_mask=self_bias)  # [rows, heads, 1, hd]
        h = h + layer.self_attn.out_proj(out.reshape(rows, d))
        if cache.cross_kv[i] is not None:
            attn = layer.encoder_attn
            q = attn.q_proj(_norm(layer.encoder_attn_layer_norm, h)).view(rows, heads, 1, head_dim)
            k, v = cache.cross_kv[i]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cross_bias)
            h = h + attn.out_proj(out.reshape(rows, d))
        h = h + layer.fc2(layer.activation_fn(layer.fc1(_norm(layer.final_layer_norm, h))))
    return model._lm_logits(_norm(dec.layer_norm, h)).float()
