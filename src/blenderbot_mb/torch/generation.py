"""`generate()` for the PyTorch backend: the core's search (`blenderbot_mb.search`) over PyTorch arrays.

What lives here is only what is PyTorch: `TorchOps` (the core's array operations), the decoder step (eager, or
captured once as a CUDA graph and replayed), and the loop driver, a Python loop that on accelerators asks
the device whether to stop only every few steps. The settings, the edge-case rules, the logits processors
and greedy/sampling/beam search are the core's, the same for every backend.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..outputs import GenerateOutput
from ..search import (
    build_processors,
    check_inputs,
    check_rows_attend,
    decode,
    encoder_ngrams,
    infer_attention_mask,
    prepare,
    stream_ids,
)
from ..search_ops import ArrayOps, NumpyOps
from .decoding import DecodingOptions, bucketed, cache_buffers, decode_function, fused_weights

_DTYPES = {"int32": torch.long, "float32": torch.float32, "bool": torch.bool}  # PyTorch indexes with int64


class TorchOps(ArrayOps):
    """The core's array operations in PyTorch (ids are int64 here: PyTorch indexes with int64)."""

    def __init__(self, device):
        self.device = device
        self._columns = {}  # fill_columns' index tensors, made once per generate() call

    def constant(self, value, dtype):
        return torch.as_tensor(value, dtype=_DTYPES[dtype], device=self.device)

    def full(self, shape, value, dtype):
        return torch.full(shape, value, dtype=_DTYPES[dtype], device=self.device)

    def arange(self, n):
        return torch.arange(n, device=self.device)

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def to_host(self, x):
        return x.cpu().numpy()

    def where(self, cond, x, y):
        return torch.where(cond, x, y)

    def masked_fill(self, x, mask, value):
        return x.masked_fill(mask, value)

    def fill_columns(self, x, ids, value):  # index_fill: far cheaper than a broadcast [1, V] mask
        if ids not in self._columns:
            self._columns[ids] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return x.index_fill(1, self._columns[ids], value)

    def any(self, x, axis=None, keepdims=False):
        return x.any() if axis is None else x.any(axis, keepdim=keepdims)

    def all(self, x, axis=None, keepdims=False):
        return x.all() if axis is None else x.all(axis, keepdim=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return x.max() if axis is None else x.amax(axis, keepdim=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return x.min() if axis is None else x.amin(axis, keepdim=keepdims)

    def argmax(self, x):
        return x.argmax(-1)

    def top_k(self, x, k):
        return torch.topk(x, k)

    def sort(self, x):
        return torch.sort(x)

    def take_along(self, x, index, axis):
        return x.gather(axis, index)

    def gather_beams(self, x, index):  # a gather, cheaper than advanced indexing
        return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


    def column(self, x, index):
        return x[..., index]

    def set_column(self, x, index, values):
        x[..., index] = values
        return x

    def slice_columns(self, x, start, size):
        start = min(max(start, 0), x.shape[1] - size)
        return x[:, start:start + size]

    def mark(self, ids, valid, size):
        out = torch.zeros(ids.shape[0], size + 1, dtype=torch.bool, device=ids.device)
        return out.scatter_(1, torch.where(valid, ids, size).reshape(ids.shape[0], -1), True)[:, :size]

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, xs, axis):
        return torch.cat(xs, axis)

    def repeat(self, x, count, axis):
        return x.repeat_interleave(count, axis)

    def log_softmax(self, x):
        return F.log_softmax(x, -1)

    def softmax(self, x):
        return F.softmax(x, -1)

    def cumsum(self, x):
        return x.cumsum(-1)

    def log(self, x):
        return torch.log(x)

    def streams(self, ids, base=None):
        """One CPU torch.Generator per row (the same draws on every device), seeded from the row's name."""
        return [torch.Generator().manual_seed(int(np.random.SeedSequence([int(w) for w in row])
                                                  .generate_state(1, np.uint64)[0]))
                for row in np.asarray(ids)]

    def uniform(self, key, shape):
        return torch.stack([torch.rand(shape, generator=g) for g in key]).to(self.device), key

    def while_loop(self, cond, body, state, max_steps, lazy=False):
        every = 8 if lazy and self.device.type != "cpu" else 1  # on accelerators, sync with the host less often
        for n in range(max_steps):
            if n % every == 0 and not bool(cond(state)):
                break
            state = body(state)
        return state


# ---------------------------------------------------------------------- the decoder step as a CUDA graph
class CudaGraphStep:
    """One decoder step (all layers + LM head; the model's forward, or the fused or compiled step of
    `decoding.py`) captured once as a CUDA graph and replayed for every token: one launch instead of hundreds
    of small kernels, which is what bounds decoding speed at small batch.

    Everything the graph reads lives in static buffers owned here: the KVCache's self-attention buffers
    [layers, 2, rows, heads, max_length, head_dim] (attended in full, masked beyond the step index), the
    cross-attention keys/values and the encoder mask (padded to a multiple of BUCKET positions, so inputs of
    similar length share a graph), the tokens and the step index, which lives on the device. A model keeps a
    few captured steps, keyed by shapes, dtype, decoding options and its parameters' addresses, so repeated generate() calls
    replay without capturing again. Beam search reorders the buffers in place between steps.
    """

    BUCKET = 32

    def __init__(self, model, rows: int, max_length: int, encoder_length: int, dtype, device,
                 options: DecodingOptions):
        from .modeling import KVCache

        layers = model.get_decoder().layers
        heads, head_dim = layers[0].self_attn.num_heads, layers[0].self_attn.head_dim
        buffers = cache_buffers(len(layers), (2, rows, heads, max_length, head_dim), dtype, device,
                                per_layer=options.compile)
        self.cross = torch.zeros(len(layers), 2, rows, heads, encoder_length, head_dim, dtype=dtype, device=device)
        self.mask = torch.zeros(rows, encoder_length, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        cross = [(c[0], c[1]) for c in self.cross] if encoder_length else None  # none: decoder-only
        self.cache = KVCache(len(layers), cross_kv=cross, buffers=buffers, index=self.index)

        fn, weights = decode_function(model, options), fused_weights(model) if options.fused else None

        def run():
            return fn(model, self.tokens, self.cache, self.mask if encoder_length else None, weights)

        side = torch.cuda.Stream(device)  # warm up on a side stream, as CUDA graph capture requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()  # writes cache position 0, which the first real step overwrites
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()
        if isinstance(buffers, list) and rows > 1:  # per-layer buffers: beam search reorders them in one replay
            self.order = torch.arange(rows, device=device)
            self.reorder_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.reorder_graph):
                for kv in buffers:  # every position: the unwritten ones are masked, then overwritten
                    kv.copy_(kv.index_select(1, self.order))
            self.cache.reorder = self.reorder  # this cache's reorder (KVCache.reorder: a kernel pair per layer)

    def reorder(self, rows) -> None:
        self.order.copy_(rows)
        self.reorder_graph.replay()

    def load(self, cross, mask) -> None:
        """A new batch: its cross-attention keys/values and encoder mask (None: no padding)."""
        length = cross[0][0].shape[2]
        for i, (k, v) in enumerate(cross):
            self.cross[i, 0, :, :, :length].copy_(k)
            self.cross[i, 1, :, :, :length].copy_(v)
        self.mask.zero_()
        self.mask[:, :length] = 1 if mask is None else mask

    def __call__(self, tokens, index: int, cache):
        self.tokens.copy_(tokens)
        self.index.fill_(index)
        cache.written = index + 1
        self.graph.replay()
        return self.logits.clone(), cache  # the graph's output buffer is reused by the next replay


# ---------------------------------------------------------------------- generate
class GenerationMixin:
    """`generate()` for BlenderbotForConditionalGeneration and BlenderbotForCausalLM (decoder-only: the
    input ids are the decoder prompt)."""

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """Replies for a batch of encoder inputs (BlenderbotForCausalLM: continuations of the prompts).

        Settings: the model's `generation_config`, then `generation_config`, then keyword arguments (max_length,
        max_new_tokens, num_beams, do_sample, top_k, ...). `seed=` (an int, or one per input) makes sampling
        repeatable, each sampled reply from its own stream (`blenderbot_mb.search.stream_ids`); a `generator=`
        torch.Generator (else torch's global one) draws the seed when none is given. Hooks: `streamer=`
        (transformers' TextStreamer protocol), `stopping_criteria=`, `stop_strings=` (with `tokenizer=`),
        `max_time=`, `logits_processor=` (callables `(input_ids, scores) -> scores`, after the built-in ones).
        `decoder_input_ids=` starts the replies from a prompt. On CUDA devices the decoder step runs as a
        replayed CUDA graph; `cuda_graph=False` runs it eagerly. `fused=True` runs the decoder step written for
        decoding, `compile=True` (or a torch.compile mode) compiles the step, `packed=True` (float32 on the
        CPU) runs the fused step over weights prepared for the row count (see `decoding.py`: the fastest CPU
        path, at the cost of a second copy of the decoder's weights), `freeze=True` (with compile=, on the CPU)
        compiles the fused step with the weights frozen into it; all default to the model's
        `decoding_options` (see `compile_decoding()`, `pack_decoding()`).

        Returns ids `[batch * num_return_sequences, length]` (prompt included), padded after each reply's end;
        with `return_dict_in_generate=True` a GenerateOutput (`sequences_scores` for beam search, `scores`
        with `output_scores=True`).
        """
        generator, cuda_graph = kwargs.pop("generator", None), kwargs.pop("cuda_graph", True)
        options = self.decoding_options.replace(fused=kwargs.pop("fused", None), compile=kwargs.pop("compile", None),
                                                packed=kwargs.pop("packed", None), freeze=kwargs.pop("freeze", None))
        decoder_only = not self.config.is_encoder_decoder
        if input_ids is None:
            raise InputError("generate() needs input_ids (the tokenized conversation)")
        check_inputs(input_ids, attention_mask, self.config, "input_ids")
        device = self.device
        input_ids = torch.as_tensor(input_ids, device=device)
        prompt = input_ids if decoder_only else kwargs.pop("decoder_input_ids", None)
        if prompt is not None and not decoder_only:
            check_inputs(prompt, None, self.config, "decoder_input_ids")
            prompt = torch.as_tensor(prompt, device=device)
        request = prepare(generation_config or self.generation_config, self.config, kwargs,
                          prompt_length=1 if prompt is None else prompt.shape[1])
        if generator is not None and request.seed is not None:
            raise ConfigError("pass seed= or generator=, not both")
        gen, spec, ops = request.gen, request.spec, TorchOps(device)
        if attention_mask is None:
            attention_mask = infer_attention_mask(ops, input_ids, gen)
        attention_mask = torch.as_tensor(attention_mask, device=device)
        check_rows_attend(attention_mask.cpu().numpy())
        seed = request.seed
        if seed is None and spec.streams_per_input:  # a seed from the given (else torch's global) generator
            seed = int(torch.randint(2**62, (), generator=generator,
                                     device=generator.device if generator is not None else "cpu"))
        ids = stream_ids(NumpyOps(), spec, seed, input_ids.shape[0])  # [rows, 6] or None: not sampling
        streams = None if ids is None else ops.streams(ids)
        if decoder_only:
            if not bool(attention_mask.all()):
                raise InputError("BlenderbotForCausalLM.generate() takes prompts without padding (one length "
                                 "per call)")
            step, cache = self._decoder_step(None, None, spec, rows=input_ids.shape[0] * spec.copies,
                                             cuda_graph=cuda_graph, options=options)
            processors = build_processors(ops, spec.plan)
        else:
            if prompt is None:
                prompt = torch.full((input_ids.shape[0], 1), gen.decoder_start_token_id, device=device)
            states = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        return_dict=True).last_hidden_state
            step, cache = self._decoder_step(states, None if bool(attention_mask.all()) else attention_mask, spec,
                                             rows=states.shape[0] * spec.copies, cuda_graph=cuda_graph,
                                             options=options)
            processors = build_processors(ops, spec.plan, encoder_ngrams(ops, spec.plan, input_ids, spec.copies))
        sequences, length, scores = decode(ops, request, step=step, cache=cache, prompt=prompt,
                                           processors=processors, key=streams, reorder=_reorder)
        sequences = sequences[:, :int(length)]
        if not gen.return_dict_in_generate:
            return sequences
        recorded = request.hooks.recorded[:int(length) - spec.prompt_length] if spec.output_scores else None
        return GenerateOutput(sequences=sequences, sequences_scores=scores,
                              scores=tuple(recorded) if recorded is not None else None)

    # ------------------------------------------------------------------ the step
    decoding_options = DecodingOptions()  # generate()'s decoder step; set by compile_decoding()

    def compile_decoding(self, fused: bool = True, mode: str = "default", backend: str = "inductor",
                         freeze: bool = False):
        """Make later generate() calls run a compiled decoder step: `torch.compile(fullgraph=True,
        dynamic=False)` of the fused step (`fused=False`: of the model's own forward). Each new shape (rows,
        max_length, encoder length bucket) compiles once, on its first call; on CUDA devices the compiled
        step is then captured as a CUDA graph, so `mode` is "default" or "max-autotune-no-cudagraphs".
        `freeze=True` (CPU, inductor, fused): the weights are frozen into the compiled step (inductor's
        freezing: prepacked for its matrix products), which compiles again after a weight changes. Returns
        the model."""
        self.decoding_options = DecodingOptions(fused=fused, compile=True, mode=mode, backend=backend, freeze=freeze)
        return self

    def pack_decoding(self, packed: bool = True, compile_one_row: bool | str = False):
        """Make later generate() calls on the CPU run the fused step over weights prepared for the row count
        (`packed=True`, float32; see `decoding.py`); `packed=False` goes back to the model's forward.
        `compile_one_row=True` (or a torch.compile mode; True: "max-autotune-no-cudagraphs") runs one-row
        decoding (greedy or sampling, one reply) with the step compiled and the weights frozen in, the fastest
        for it on the development CPU (its first call of each shape compiles: tens of seconds for the 400M
        shape). Returns the model."""
        mode = compile_one_row if isinstance(compile_one_row, str) else \
            "max-autotune-no-cudagraphs" if packed and compile_one_row else "default"
        self.decoding_options = DecodingOptions(fused=packed, packed=packed, compile=bool(packed and compile_one_row),
                                                mode=mode, freeze=bool(packed and compile_one_row))
        return self

    def _decoder_step(self, encoder_states, encoder_mask, spec, rows: int, cuda_graph: bool,
                      options: DecodingOptions = DecodingOptions()):
        """(step, cache): `step(tokens [rows], index, cache) -> (float32 logits [rows, vocab], cache)` over a
        KVCache preallocated to max_length; on CUDA devices a replayed CUDA graph, else run as it is."""
        from .modeling import KVCache

        layers = self.get_decoder().layers
        cross = self._cross_kv(encoder_states, spec.copies) if encoder_states is not None else None
        if encoder_mask is not None and spec.copies > 1:
            encoder_mask = encoder_mask.repeat_interleave(spec.copies, 0)
        dtype, device = self.dtype, self.device
        options = options.for_rows(self, rows)
        # refreshed each call (weights may change in place); packed ones when a weight's version changed
        weights = fused_weights(self, options.packed, rows) if options.fused and not options.freeze else None
        if device.type == "cuda" and cuda_graph:
            length = encoder_states.shape[1] if encoder_states is not None else 0
            graph = self._graph_step(rows, spec.max_length, length, dtype, device, options)
            if cross is not None:
                graph.load(cross, encoder_mask)
            return graph, graph.cache
        attn = layers[0].self_attn
        buffers = cache_buffers(len(layers), (2, rows, attn.num_heads, spec.max_length, attn.head_dim), dtype,
                                device, per_layer=options.compile)
        if not (options.fused or options.compile):  # the model's forward over the written positions (a host index)
            cache = KVCache(len(layers), cross_kv=cross, buffers=buffers)

            def step(tokens, index, cache):
                cache.index, cache.written = index, index + 1
                return self._next_logits(tokens, cache, encoder_mask), cache

            return step, cache
        if options.compile and cross is not None:  # a few encoder lengths to compile for, not one per input
            cross, encoder_mask = bucketed(cross, encoder_mask, CudaGraphStep.BUCKET)
        fn, position = decode_function(self, options), torch.zeros(1, dtype=torch.long, device=device)
        cache = KVCache(len(layers), cross_kv=cross, buffers=buffers, index=position)

        def device_step(tokens, index, cache):
            position.fill_(index)
            cache.written = index + 1
            return fn(self, tokens, cache, encoder_mask, weights), cache

        return device_step, cache

    def _cross_kv(self, encoder_states, copies: int):
        """Per decoder layer the cross-attention keys/values, computed once (repeated for beams/samples)."""
        out = []
        for layer in self.get_decoder().layers:
            k, v = layer.encoder_attn.project_kv(encoder_states)
            if copies > 1:
                k, v = k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)
            out.append((k, v))
        return out

    def _graph_step(self, rows, max_length, encoder_length, dtype, device, options,
                    keep: int = 16) -> CudaGraphStep:
        """A captured step for these shapes, reused while the parameters stay where they are. At most `keep`
        are kept (a server sees a few batch shapes and input-length buckets over and over: capturing again
        costs far more than a step), least recently used out first, and their cache buffers take at most a
        quarter of the device's memory."""
        steps = self.__dict__.setdefault("_cuda_graph_steps", {})
        bucket = -(-encoder_length // CudaGraphStep.BUCKET) * CudaGraphStep.BUCKET
        fused = [t for pair in self.__dict__.get("_fused_qkv", ()) for t in pair] if options.fused else []
        where = tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers(), *fused))
        key = (rows, max_length, bucket, dtype, str(device), where, options)
        if key not in steps:
            budget = torch.cuda.get_device_properties(device).total_memory // 4

            def size(k):  # bytes of a step's self- and cross-attention buffers: rows * (L + bucket) * d * layers * 2
                return k[0] * (k[1] + k[2]) * self.config.d_model * len(self.get_decoder().layers) * 2 * \
                    torch.tensor([], dtype=k[3]).element_size()

            while steps and (len(steps) >= keep or sum(size(k) for k in steps) + size(key) > budget):
                steps.pop(next(iter(steps)))
            steps[key] = CudaGraphStep(self, rows=rows, max_length=max_length, encoder_length=bucket, dtype=dtype,
                                       device=device, options=options)
        steps[key] = steps.pop(key)  # most recently used last
        return steps[key]

    def _next_logits(self, tokens, cache, encoder_mask):
        """Float32 logits [rows, vocab] of the token after `tokens` [rows] (at the cache's write index)."""
        hidden = self.get_decoder()(input_ids=tokens[:, None], encoder_attention_mask=encoder_mask,
                                    past_key_values=cache, use_cache=True, return_dict=True).last_hidden_state
        return self._lm_logits(hidden[:, -1]).float()


def _reorder(cache, rows):
    cache.reorder(rows)
    return cache

