"""The decoder step of `generate()`, one token per row over the preallocated cache, in three forms:

- the model's own decoder forward (the default on the CPU, and wherever the model's Linear layers are replaced:
  LoRA, int8),
- a fused step written for decoding (`fused=True`; the default on GPUs: 0.90-0.92x the forward's time a step
  at 400M, no compilation, see docs/benchmarks.md): one QKV projection per layer instead of three (the
  concatenated weights are copied again from the model's tensors by the generate call after one of them
  moved or changed in place, as their version counters tell: writes through `.data` are not seen; nothing
  changes in the checkpoints), the new keys and values written
  into the cache with one copy, no per-step head reshapes, the masks built once per step rather than per
  layer;
- the fused step written with Triton kernels (`kernels=True`, NVIDIA GPUs; see kernels.py): 8 kernels per
  decoder layer, the layer norms, biases, activations and residuals inside the products' kernels; up to 32
  rows of models up to d_model 1280 with a several-row product kernel, more rows or wider models the fused step,
  compiled on GPUs, with the Triton attention kernel (beam search reorders a table of the cache rows each
  position is read from, not the cache);
- the model's forward or the fused step compiled with `torch.compile` (`compile=True` or a mode name;
  fullgraph, static shapes);
- on the CPU, the fused step over Linear weights prepared for the row count (`packed=True`, float32): for one
  row stored [in, out] (the one-row product reads them faster, see cpu_layout.py), for several rows packed
  by oneDNN (`torch.ops.mkldnn`), whose blocked products for a few rows took half the time of the MKL ones
  on the development machine's AMD CPU. The prepared copies are kept with the model (one per kind, as large
  as the decoder's Linear weights and the LM head) and made again when a weight changes; with compile=, one
  row's step compiles (several rows run eagerly), and with freeze=True too, the frozen step below runs for
  one row: the fastest for each on the development CPU;
- on the CPU, the fused step compiled with inductor's freezing (`compile=..., freeze=True`): the model's
  weights become constants of the compiled step, which inductor prepacks for its matrix products (with mode
  "max-autotune-no-cudagraphs", into its own C++ GEMM kernels where they time faster); compiled again when
  a weight changes.

Every form reads the step index from a device tensor, so shapes never change while decoding: the compiled
step is traced once per shape and a CUDA graph can replay it (generation.CudaGraphStep).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # modes with their own CUDA graphs would nest ours


@dataclass(frozen=True)
class DecodingOptions:
    """How generate() runs its decoder step: fused or the model's forward, compiled or not (`mode`,
    `backend`: torch.compile's)."""

    fused: bool | None = None  # None: the fused step on GPUs where the Linear layers are plain, else the forward
    compile: bool = False
    mode: str = "default"
    backend: str = "inductor"
    packed: bool = False
    freeze: bool = False
    kernels: bool = False
    attention_kernel: bool = False  # kernels.py's attention reading a beam table: kernels=True for several rows
    compile_search: bool = True  # with compile= (or kernels=True on CUDA) a device loop's search compiles too

    def __post_init__(self):
        if self.kernels and (self.compile or self.packed or self.freeze or not self.fused):
            raise ConfigError("kernels=True runs the step written with Triton kernels (kernels.py), on its own: "
                              "pass it without compile=, packed= or freeze=")
        if self.packed and not self.fused:
            raise ConfigError("packed weights are the fused step's: pass fused=True with packed=True")
        if self.freeze and not (self.fused and self.compile and self.backend == "inductor"):
            raise ConfigError("freeze=True freezes the model's weights into the fused step compiled by inductor: "
                              "pass it with fused=True and compile=")
        if self.compile and self.backend == "inductor" and self.mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)} (generate() replays its own "
                              f"CUDA graph), got {self.mode!r}")

    def replace(self, fused=None, compile=None, packed=None, freeze=None, kernels=None) -> DecodingOptions:
        """These options with generate()'s `fused=` / `compile=` (True, False or a mode name) / `packed=` /
        `freeze=` / `kernels=` applied (packed=True, freeze=True and kernels=True imply fused)."""
        mode = compile if isinstance(compile, str) else self.mode
        kernels = self.kernels if kernels is None else bool(kernels)
        if kernels and not self.kernels:  # asked for in this call: the model's other defaults give way
            compile, packed, freeze = compile or False, packed or False, freeze or False
        packed = self.packed if packed is None else bool(packed)
        freeze = self.freeze if freeze is None else bool(freeze)
        return DecodingOptions(fused=packed or freeze or kernels or (self.fused if fused is None else bool(fused)),
                               compile=self.compile if compile is None else compile is not False,
                               mode=mode, backend=self.backend, packed=packed, freeze=freeze, kernels=kernels,
                               compile_search=self.compile_search)

    def for_rows(self, model, rows: int) -> DecodingOptions:
        """The options a step of `rows` rows runs with: packed weights compiled for one row only (several rows
        run oneDNN's tensors eagerly), and with freeze=True that one row's step compiled with the model's own
        weights frozen in. Refuses packed weights off the CPU or in other dtypes, frozen steps off the CPU."""
        if self.kernels:
            if tensorflow_before_triton():
                raise ConfigError("kernels=True loads Triton, which aborts a process that imported TensorFlow "
                                  "first (both bundle LLVM): run it in a process without TensorFlow, or import "
                                  "triton before tensorflow")
            from .kernels import check, rows_fit

            check(model)
            if rows > 1 and rows_fit(model, rows):  # several rows: the kernels' step, the products by the several-row
                # kernel, the attention kernel reading the beams' keys through a table
                return dataclasses.replace(self, attention_kernel=True)
            if rows > 1:  # more rows, wider models: the fused step (compiled on GPUs) around the attention kernel
                return dataclasses.replace(self, kernels=False, attention_kernel=True,
                                           compile=model.device.type == "cuda")
        if self.fused is None:  # the default: fused on GPUs (one more copy of the q/k/v weights, no compilation)
            return dataclasses.replace(self, fused=model.device.type == "cuda" and plain_linears(model)).for_rows(
                model, rows)
        if self.freeze and model.device.type != "cpu":
            raise ConfigError(f"freeze=True is for the CPU (on GPUs generate() replays a CUDA graph of the step); "
                              f"this model is on {model.device.type}")
        if not self.packed:
            if self.fused and not plain_linears(model):
                raise ConfigError("fused=True reads plain Linear weights; this model's layers are replaced (LoRA, "
                                  "int8): generate without fused=, or merge the adapters first")
            return self
        if model.device.type != "cpu" or model.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            raise ConfigError(f"packed weights are a float32 CPU path (with oneDNN); this model is {model.dtype} "
                              f"on {model.device.type}")
        if type(model.get_decoder().layers[0].fc1) is not torch.nn.Linear:
            raise ConfigError("packed weights are for float Linear layers; this model's are replaced (int8 layers "
                              "pack their own weights): generate without packed=")
        if rows > 1:
            return dataclasses.replace(self, compile=False, freeze=False)
        return dataclasses.replace(self, packed=False) if self.freeze else self


def decode_function(model, options: DecodingOptions):
    """`fn(tokens [rows], cache, encoder_mask [rows, S] or None, weights) -> float32 logits [rows, vocab]`, made
    (and compiled) once per model and options; `weights` is fused_weights()' (None unless fused)."""
    made = model.__dict__.setdefault("_decode_functions", {})
    if options.freeze:  # compiled with the weights as they are now: again once one changed
        key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
        if options in made and made[options][0] == key:
            return made[options][1]
        made.pop(options, None)
        import torch._inductor.config as inductor_config

        compiled = PerShape(lambda: torch.compile(own_code(fused_logits), fullgraph=True, dynamic=False,
                                                  mode=options.mode))

        def fn(*args):  # freezing is read when a shape compiles, outside torch.compile's per-call options
            with inductor_config.patch(freezing=True):
                return compiled(*args)

        made[options] = key, fn
        return fn
    if options not in made:
        if options.kernels:
            from .kernels import kernel_logits

            made[options] = kernel_logits
            return kernel_logits
        fn = fused_logits if options.fused else plain_logits
        if options.compile:
            extra = {"mode": options.mode} if options.backend == "inductor" else {}

            def make(fn=fused_kernel_logits if options.attention_kernel else fn):
                # (a function, not a functools.partial: torch.compile runs a partial through one wrapper
                # frame that every compiled partial shares, and so one recompile limit: the ninth would fail)
                return torch.compile(own_code(fn), fullgraph=True, dynamic=False, backend=options.backend, **extra)

            fn = PerShape(make)
        elif options.attention_kernel:
            fn = fused_kernel_logits
        made[options] = fn
    return made[options]


class PerShape:
    """A compiled step per shape of its inputs (rows, cache length, encoder length, dtype, ...), each from
    `make()` with a code object of its own: torch.compile counts a code object's shapes against its recompile
    limit (8), past which a fullgraph compile fails, so a process that decodes at many lengths would fail
    at the ninth. The KEEP most recently used are kept."""

    KEEP = 16

    def __init__(self, make):
        self.make, self.compiled = make, collections.OrderedDict()

    def __call__(self, model, tokens, cache, encoder_mask, weights):
        key = _shapes((tokens, cache.buffers, cache.cross_kv, cache.index, cache.table, encoder_mask))
        fn = self.compiled.pop(key, None) or self.make()
        self.compiled[key] = fn
        while len(self.compiled) > self.KEEP:
            self.compiled.popitem(last=False)
        return fn(model, tokens, cache, encoder_mask, weights)


def _shapes(x):
    if torch.is_tensor(x):
        return tuple(x.shape), x.dtype, x.device
    if isinstance(x, (list, tuple)):
        return tuple(_shapes(y) for y in x)
    return x if x is None or isinstance(x, (int, float, bool)) else type(x).__name__


def own_code(fn):
    """`fn` with a code object of its own: torch.compile keeps the graphs it compiled, and counts them against its
    recompile limit (8 shapes), per code object; so each compiled step (a model's, with its options and frozen
    weights) has its own, freed with it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def cache_buffers(layers: int, shape, dtype, device, per_layer: bool):
    """The preallocated self-attention cache: one [layers, *shape] tensor, or (`per_layer`, for compiled steps,
    which write in place only into tensors they get whole) a list of `layers` [*shape] tensors."""
    if per_layer:
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    return torch.zeros(layers, *shape, dtype=dtype, device=device)


def bucketed(cross, encoder_mask, size: int):
    """The cross-attention keys/values [rows, heads, S, head_dim] per layer and the encoder mask [rows, S] (None:
    all attended) padded with masked positions to `size` (the input's `search.encoder_bucket`): a compiled step
    (static shapes) then compiles for a few encoder lengths rather than one per input length. Masked keys weigh
    exactly 0."""
    k = cross[0][0]
    rows, length = k.shape[0], k.shape[2]
    pad = size - length
    if encoder_mask is None:
        encoder_mask = torch.ones(rows, length, dtype=torch.long, device=k.device)
    return [(F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) for k, v in cross], F.pad(encoder_mask, (0, pad))


def plain_logits(model, tokens, cache, encoder_mask, weights=None):
    """The model's own decoder forward for one token per row."""
    return model._next_logits(tokens, cache, encoder_mask)


_registrations = 0  # modules, parameters and buffers registered on any module since this module was imported


def _registered(*_) -> None:
    global _registrations
    _registrations += 1


for _hook in ("module", "parameter", "buffer"):  # torch's global hooks: called for every registration
    getattr(torch.nn.modules.module, f"register_module_{_hook}_registration_hook")(_registered)


def model_tensors(model) -> tuple:
    """The model's parameters and buffers, listed once and again only after a module, parameter or buffer was
    registered anywhere (assigned, replaced, loaded with assign=True): walking the modules took ~0.5 ms a
    generate() call. Tensors moved or changed in place keep their place here (callers read their addresses
    and version counters)."""
    kept = model.__dict__.get("_model_tensors")
    if kept is None or kept[0] != _registrations:
        kept = _registrations, (*model.parameters(), *model.buffers())
        model.__dict__["_model_tensors"] = kept
    return kept[1]


def fused_qkv(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer the self-attention's q/k/v weights [3 * d, d] and biases [3 * d], concatenated into
    buffers the model keeps (a captured step reads them by address), copied again from the model's tensors
    when one of them moved or changed in place (its address or version counter changed)."""
    kept = model.__dict__.get("_fused_qkv_sources")
    if kept is None or kept[0] != _registrations:
        attn = [layer.self_attn for layer in model.get_decoder().layers]
        sources = [tuple(t for p in (a.q_proj, a.k_proj, a.v_proj) for t in (p.weight, p.bias)) for a in attn]
        kept = [_registrations, sources, None]
        model.__dict__["_fused_qkv_sources"] = kept
    sources = kept[1]
    like = sources[0][0]
    qkv = model.__dict__.get("_fused_qkv")
    if qkv is None or qkv[0][0].dtype != like.dtype or qkv[0][0].device != like.device:
        d = like.shape[1]
        qkv = [(like.new_empty(3 * d, d), like.new_empty(3 * d)) for _ in sources]
        model.__dict__["_fused_qkv"] = qkv
        kept[2] = None
    key = tuple((t.data_ptr(), t._version) for parts in sources for t in parts)
    if key != kept[2]:
        with torch.no_grad():
            for (w, b), (qw, qb, kw, kb, vw, vb) in zip(qkv, sources, strict=True):
                torch.cat([qw, kw, vw], out=w)
                torch.cat([qb, kb, vb], out=b)
        kept[2] = key
    return qkv


def fused_weights(model, packed: bool = False, rows: int = 1):
    """The fused step's weights: (per decoder layer {name: (weight, bias)} for the self-attention's fused
    qkv and out, the cross-attention's q and out, fc1 and fc2; the LM head's (weight, bias), or None: the
    model's own head). `packed`: all of them prepared for `rows` rows on the CPU (packed_weights())."""
    if packed:
        return packed_weights(model, rows)
    qkv = fused_qkv(model)
    kept = model.__dict__.get("_fused_weights")
    if kept is not None and kept[0] == _registrations and kept[1] is qkv:
        return kept[2]
    layers = []
    for (w, b), layer in zip(qkv, model.get_decoder().layers, strict=True):
        own = {name: (m.weight, m.bias) for name, m in _linears(layer).items() if name != "qkv"}
        layers.append({"qkv": (w, b), **own})
    model.__dict__["_fused_weights"] = _registrations, qkv, (layers, None)
    return layers, None


def own_weights(model):
    """fused_weights()' layout read from the model's modules, the q/k/v weights concatenated: for a step compiled
    with freezing, where those are constants and their concatenation is folded once."""
    layers = []
    for layer in model.get_decoder().layers:
        weights = {}
        for name, m in _linears(layer).items():
            parts = m if isinstance(m, tuple) else (m,)
            weights[name] = (torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts])) \
                if len(parts) > 1 else (m.weight, m.bias)
        layers.append(weights)
    return layers, None


def tensorflow_before_triton() -> bool:
    """Whether loading Triton now would abort the process: TensorFlow is imported and Triton is not (both
    bundle LLVM; Triton first, then TensorFlow, works)."""
    return "tensorflow" in sys.modules and "triton" not in sys.modules


def plain_linears(model) -> bool:
    """Whether every Linear layer the fused step reads is a plain torch.nn.Linear (not LoRA's, not int8's)."""
    return all(type(m) is torch.nn.Linear for layer in model.get_decoder().layers
               for m in _flat(_linears(layer).values()))


def _linears(layer) -> dict:
    a, c = layer.self_attn, layer.encoder_attn
    return {"qkv": (a.q_proj, a.k_proj, a.v_proj), "out": a.out_proj, "cross_q": c.q_proj, "cross_out": c.out_proj,
            "fc1": layer.fc1, "fc2": layer.fc2}


def packed_weights(model, rows: int):
    """fused_weights() prepared for `rows` rows on the CPU: stored [in, out] for one row, packed by oneDNN
    (`torch.ops.mkldnn._reorder_linear_weight`, tuned for `rows`) for more. Kept with the model, one set
    for one row and one for several, and prepared again when a weight moves or changes in place (a
    tensor's version counter counts in-place writes)."""
    dec, head = model.get_decoder(), model.get_output_embeddings()
    bias = getattr(model, "final_logits_bias", None)
    tensors = [t for layer in dec.layers for m in _flat(_linears(layer).values()) for t in (m.weight, m.bias)]
    tensors += [head.weight] + ([bias] if bias is not None else [])
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    kind = "one row" if rows == 1 else "rows"
    kept = model.__dict__.setdefault("_packed_weights", {})
    if kind in kept and kept[kind][0] == key:
        return kept[kind][1]
    kept.pop(kind, None)  # the old copy goes before the new one is made

    def prepare(w):  # [out, in] -> the same values, stored for this row count
        return w.t().contiguous().t() if rows == 1 else torch.ops.mkldnn._reorder_linear_weight(w, rows)

    with torch.no_grad():
        layers = []
        for layer in dec.layers:
            weights = {}
            for name, m in _linears(layer).items():
                parts = m if isinstance(m, tuple) else (m,)
                w, b = (torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts])) \
                    if len(parts) > 1 else (parts[0].weight, parts[0].bias)
                weights[name] = (prepare(w), b.detach())
            layers.append(weights)
        weights = layers, (prepare(head.weight), None if bias is None else bias[0].detach().clone())
    kept[kind] = (key, weights)
    return weights


def _flat(items):
    for m in items:
        yield from m if isinstance(m, tuple) else (m,)


def linear(x, weight, bias):
    """F.linear, also over oneDNN-packed weights."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def fused_kernel_logits(model, tokens, cache, encoder_mask, weights):
    """fused_logits with kernels.py's attention kernel (kernels=True's step of more than 32 rows, or of models
    wider than 1280)."""
    return fused_logits(model, tokens, cache, encoder_mask, weights, attention_kernel=True)


def fused_logits(model, tokens, cache, encoder_mask, weights, attention_kernel: bool = False):
    """One decoder step written for decoding; the same arithmetic as the decoder's forward, in fewer kernels.
    cache: a KVCache with per-layer `buffers` [2, rows, heads, max_length, head_dim] and a device `index` [1];
    weights: fused_weights()', or None: own_weights() (traced, for freezing). `attention_kernel`: attention by
    kernels.py's Triton kernel (which reads the beams' keys through the cache's `table` where it has one)
    instead of scaled_dot_product_attention over masks."""
    dec = model.get_decoder()
    rows, index = tokens.shape[0], cache.index
    _, _, heads, length, head_dim = cache.buffers[0].shape
    d = heads * head_dim
    h = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(index)  # [rows, d]
    if attention_kernel:
        from .kernels import attention

        if cache.table is not None:  # each row's new position is in its own cache row
            cache.table.index_copy_(1, index, torch.arange(rows, dtype=cache.table.dtype, device=h.device)[:, None])
    else:
        lowest = torch.finfo(h.dtype).min
        later = torch.arange(length, device=h.device) > index  # [max_length]: not written yet
        self_bias = torch.zeros(later.shape, dtype=h.dtype, device=h.device).masked_fill(later, lowest)
        self_bias = self_bias[None, None, None]  # [1, 1, 1, max_length]
        cross_bias = None
        if encoder_mask is not None:  # [rows, 1, 1, S]
            cross_bias = torch.zeros(encoder_mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                encoder_mask == 0, lowest)[:, None, None, :]
    layers, head = own_weights(model) if weights is None else weights
    for i, layer in enumerate(dec.layers):
        w = layers[i]
        x = linear(_norm(layer.self_attn_layer_norm, h), *w["qkv"])  # [rows, 3d]
        kv = cache.buffers[i]  # [2, rows, heads, max_length, head_dim]
        if attention_kernel:  # the new key and value written here (in the kernel, the compiled step would copy
            kv.index_copy_(3, index, x.view(rows, 3, heads, 1, head_dim)[:, 1:].transpose(0, 1))  # the cache)
            out = attention(x, kv[0], kv[1], heads=heads, index=index, new=x[:, d:], table=cache.table, write=False)
        else:
            x = x.view(rows, 3, heads, 1, head_dim)
            kv.index_copy_(3, index, x[:, 1:].transpose(0, 1))
            out = F.scaled_dot_product_attention(x[:, 0], kv[0], kv[1], attn_mask=self_bias)  # [rows, heads, 1, hd]
        h = h + linear(out.reshape(rows, d), *w["out"])
        if cache.cross_kv[i] is not None:
            q = linear(_norm(layer.encoder_attn_layer_norm, h), *w["cross_q"])
            k, v = cache.cross_kv[i]
            if attention_kernel:
                out = attention(q, k, v, heads=heads, mask=encoder_mask)
            else:
                out = F.scaled_dot_product_attention(q.view(rows, heads, 1, head_dim), k, v, attn_mask=cross_bias)
            h = h + linear(out.reshape(rows, d), *w["cross_out"])
        h = h + linear(layer.activation_fn(linear(_norm(layer.final_layer_norm, h), *w["fc1"])), *w["fc2"])
    h = _norm(dec.layer_norm, h)
    return (model._lm_logits(h) if head is None else linear(h, *head)).float()
