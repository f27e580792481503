"""`generate()` for the PyTorch backend: the core's search (`blenderbot_mb.search`) over PyTorch arrays.

What lives here is only what is PyTorch: `TorchOps` (the core's array operations), the decoder step (eager, or
captured once as a CUDA graph and replayed), and the loop driver: a Python loop that on accelerators asks
the device whether to stop only every few steps, or (`TorchOps(eager=False)`, beam search's default on
CUDA) the loop body with no host read in it, captured once as a CUDA graph and replayed (`CudaGraphLoop`).
The settings, the edge-case rules, the logits processors and greedy/sampling/beam search are the core's, the
same for every backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..scoring import transition_scores
from ..search import (
    build_processors,
    check_inputs,
    check_rows_attend,
    decode,
    decoder_prompt,
    encoder_bucket,
    encoder_ngrams,
    generate_inputs,
    generate_output,
    infer_attention_mask,
    prepare,
    record_layers,
    stream_ids,
)
from ..search_ops import ArrayOps, NumpyOps
from .decoding import (
    DecodingOptions,
    bucketed,
    cache_buffers,
    decode_function,
    fused_weights,
    model_tensors,
    own_code,
    tensorflow_before_triton,
)

TOP_K_KERNEL = True  # the long top-k by kernels.top_k on GPUs by default (benchmarks turn it off)
COMPILE_SEARCH = True  # compile=/kernels= with the device loop: the search compiled too (benchmarks turn it off)
# what a CUDA graph capture refuses: its own thread's unsafe CUDA calls only. Under PyTorch's default ("global")
# another thread's (JAX's runtime, in a process that runs both frameworks) ended captures with "operation failed
# due to a previous error during capture" (benchmarks/speed_table.py, Flax beside PyTorch, one H100)
CAPTURE_MODE = "thread_local"
# eager=False: top_k of rows of at most this many values (beam search's k of 2k candidates, of the finished set
# and the new ones) by ranks, ops a compiled search fuses with those around them; torch.topk ran 4 kernels a
# beam-search step there (0 turns it off)
RANK_TOP_K = 64
# kernels=True: the captured loop body's new state goes into its buffers by one kernel (kernels.write_state),
# where the step ran (else frozen), instead of a `where` and a copy per buffer (16 kernels, ~27 us a beam-search
# step on an H100: docs/benchmarks.md)
STATE_KERNEL = True
# a compiled search calls a captured loop's decoder step as one operator of its graph (`_loop_step`), so the
# search before and after the step compiles as one graph; else the step is a graph break, which split the
# search into a dozen small graphs and eager operations (benchmarks turn it off)
STEP_OPERATOR = True
_DTYPES = {"int32": torch.long, "float32": torch.float32, "bool": torch.bool}  # PyTorch indexes with int64
_HOST = {"int32": np.int64, "float32": np.float32, "bool": np.bool_}


class TorchOps(ArrayOps):
    """The core's array operations in PyTorch (ids are int64 here: PyTorch indexes with int64).

    `eager=False` runs the core's loop as TF and JAX do, with no host read inside a step: the step counter is
    a device tensor (shape [1], not 0-d: PyTorch reads a 0-d index tensor on the host), `select` computes both
    branches and picks with `where`, columns are read and written through index tensors, and the loop body
    is frozen once `cond` fails, so a driver may run steps past the end (`while_loop`). `loops`: where that
    body is captured as a CUDA graph (a `CudaGraphStep`'s loops, keyed by `loop_key`); None runs it as it is.
    """

    def __init__(self, device, eager: bool = True, loops: dict | None = None, loop_key=None,
                 compile_body: str | None = None, kernels: bool = False):
        self.device, self.eager = device, eager
        self.kernels = kernels  # long top-k by kernels.top_k (kernels=True, or top_k_kernel_usable())
        self.loops, self.loop_key = loops, loop_key
        self.compile_body = compile_body  # eager=False: the loop body through torch.compile (this backend)
        self._columns = {}  # fill_columns' index tensors, made once per generate() call
        self._constants = {}  # eager=False: host constants, made once (never from the host inside a capture)

    def constant(self, value, dtype):
        if self.eager or torch.compiler.is_compiling():  # (compiling: made inside the compiled graph)
            return torch.as_tensor(value, dtype=_DTYPES[dtype], device=self.device)
        array = np.asarray(value, _HOST[dtype])
        key = (dtype, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = torch.as_tensor(array, dtype=_DTYPES[dtype], device=self.device)
        return self._constants[key]

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
        if torch.is_tensor(value):  # a device scalar: masked_fill would read it on the host
            return torch.where(mask, value.to(x.dtype), x)
        return x.masked_fill(mask, value)

    def fill_columns(self, x, ids, value):  # index_fill: far cheaper than a broadcast [1, V] mask
        if ids not in self._columns:
            self._columns[ids] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return x.index_fill(1, self._columns[ids], value)

    def select(self, pred, if_true, if_false):
        if torch.is_tensor(pred):
            return torch.where(pred, if_true(), if_false())
        return if_true() if pred else if_false()

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
        if self.kernels:
            from . import kernels

            if kernels.top_k_fits(x, k):
                return kernels.top_k(x, k)
        if not self.eager and RANK_TOP_K and x.shape[-1] <= RANK_TOP_K and x.is_floating_point():
            return top_k_by_rank(x, k)
        return torch.topk(x, k)

    def sort(self, x):
        return torch.sort(x)

    def take_along(self, x, index, axis):
        return x.gather(axis, index)

    def gather_beams(self, x, index):  # a gather, cheaper than advanced indexing
        return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


    def column(self, x, index):  # index: a Python int, or a device counter [1]
        if torch.is_tensor(index):
            return x.index_select(-1, index).squeeze(-1)
        return x[..., index]

    def set_column(self, x, index, values):  # in place at a Python int; a new tensor at a device counter
        if torch.is_tensor(index):
            return torch.where(torch.arange(x.shape[-1], device=x.device) == index, values[..., None], x)
        x[..., index] = values
        return x

    def slice_columns(self, x, start, size):
        if torch.is_tensor(start):
            start = start.clamp(0, x.shape[1] - size)
            return x.index_select(1, start + torch.arange(size, device=x.device))
        start = min(max(start, 0), x.shape[1] - size)
        return x[:, start:start + size]

    def mark(self, ids, valid, size):
        out = torch.zeros(ids.shape[0], size + 1, dtype=torch.bool, device=ids.device)
        return out.scatter_(1, torch.where(valid, ids, size).reshape(ids.shape[0], -1), True)[:, :size]

    def count(self, ids, valid, size):
        out = torch.zeros(ids.shape[0], size + 1, dtype=torch.float32, device=ids.device)
        index = torch.where(valid, ids, size).reshape(ids.shape[0], -1)
        return out.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=ids.device))[:, :size]

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

    def sum(self, x, axis=None, keepdims=False):
        return x.sum() if axis is None else x.sum(axis, keepdim=keepdims, dtype=x.dtype)

    def exp(self, x):
        return torch.exp(x)

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
        if self.eager:
            every = 8 if lazy and self.device.type != "cpu" else 1  # accelerators: fewer host syncs
            for n in range(max_steps):
                if n % every == 0 and not bool(cond(state)):
                    break
                state = body(state)
            return state
        state = tuple(torch.tensor([x], device=self.device) if isinstance(x, int) else x for x in state)

        def step(st):  # the body where cond holds; else the state as it is (so extra steps change nothing)
            go, new = cond(st), body(st)
            return tuple(torch.where(go, b, a) if torch.is_tensor(a) else b
                         for a, b in zip(st, new, strict=True))

        def split(st):  # the body's new state, whether it holds (cond), and whether the loop goes on after it
            go, new = cond(st), body(st)
            return go, new, cond(new)

        def compiled(step):  # the search's few dozen small operations fused (the decoder step stays opaque);
            # a captured loop compiles once, with a code object of its own (torch.compile's recompile limit
            # counts per code object: 8 search settings would use it up); uncaptured, torch.compile's own cache
            if not self.compile_body:
                return step
            return torch.compile(own_code(step) if self.loops is not None else step, backend=self.compile_body,
                                 dynamic=False)

        if self.loops is not None:
            loop = self.loops.pop(self.loop_key, None) or CudaGraphLoop()
            self.loops[self.loop_key] = loop  # most recently used last
            while len(self.loops) > CudaGraphLoop.KEEP:
                self.loops.pop(next(iter(self.loops)))
            # a loop already captured replays its graph and never calls the step: no torch.compile() call
            # (wrapping a function costs ~2 ms of the host's time: a copy of inductor's settings)
            write = None
            if self.kernels and STATE_KERNEL:
                from .kernels import write_state as write
            fn = step if write is None else split
            return loop.run(fn if loop.graph is not None else compiled(fn), cond, state, max_steps, write=write,
                            first=fn)
        step = compiled(step)
        going = []  # after each step: does the loop go on? read LAG steps late, as the CUDA graph loop does
        for n in range(max_steps):
            if n >= CudaGraphLoop.LAG and not going[n - CudaGraphLoop.LAG]:
                break
            state = step(state)
            going.append(bool(cond(state)))
        return state


def ordered_keys(x):
    """int32 keys of x's values (float32) in their order: the float bits made signed-ordered, NaN above +inf
    (as torch.topk ranks it), -0.0 equal to 0.0 (as `kernels._keys`)."""
    x = x.float()
    x = torch.where(x != x, float("nan"), x + 0.0)
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def top_k_by_rank(x, k: int):
    """torch.topk(x, k) over the last axis (largest first, ties in the lower index first) by each value's rank:
    how many values come before it, from all pairs of a row. Elementwise ops and sums that a compiled search
    fuses with its neighbours, for short rows (n x n comparisons a row)."""
    key, n = ordered_keys(x), x.shape[-1]
    at = torch.arange(n, device=x.device)
    ahead = (key[..., None, :] > key[..., :, None]) | ((key[..., None, :] == key[..., :, None])
                                                       & (at[None, :] < at[:, None]))  # [..., i, j]: j before i
    rank = ahead.sum(-1)  # a permutation of 0..n-1 per row
    index = ((rank[..., None, :] == torch.arange(k, device=x.device)[:, None]) * at).sum(-1)
    return x.gather(-1, index), index


# ---------------------------------------------------------------------- the whole loop body as a CUDA graph
class CudaGraphLoop:
    """The search's whole loop body (the decoder step, the logits processors, the search's bookkeeping, the
    cache reorder), as `TorchOps(eager=False)` runs it, captured once as a CUDA graph and replayed once per
    token, over static buffers that hold the loop's state: a step is one launch, with no host read.

    The first WARMUP steps of a call run eagerly on a side stream (as capture requires: lazy initializations,
    torch.compile's first call, the constants the body makes from host values), the next one is captured;
    later generate() calls with the same key replay it from their first step. The body is frozen once the
    loop's condition fails, so the host need not stop it at once: at the end of each replay the condition goes
    to pinned host memory (a copy captured in the graph), and the host reads it LAG steps late (the GPU keeps a
    queued step meanwhile), at most LAG - 1 frozen steps past the end.

    What the captured body reads outside its state must stay where it was at capture, with this call's values:
    the decoder's cache, cross-attention keys/values, encoder mask and encoder n-grams live in the
    `CudaGraphStep` that owns these loops (loaded by generate()); everything else the body reads (the core's
    constants, the processors' tables) depends only on the key, and is kept alive here with the captured body.
    """

    WARMUP = 2
    LAG = 2  # how late the host reads whether the loop goes on
    KEEP = 8  # captured loops kept per CudaGraphStep (least recently used out first)
    FLAG_IN_GRAPH = True  # whether the loop goes on: copied to the host by the captured graph itself

    def __init__(self):
        self.inputs = self.graph = self.kept = None

    def run(self, step, cond, state, max_steps: int, write=None, first=None):
        """The loop's final state (copies: the buffers are reused by the next call). `step(state)` returns the
        new state, frozen where `cond` fails; with `write` (kernels.write_state) it returns (whether `cond`
        holds, the new state, whether the loop goes on after it), and `write` puts the new state and the last
        into the buffers where `cond` held. `first`: the same step uncompiled, for a new loop's first step (what
        the search makes on its first call, such as its index columns, is then there before torch.compile
        traces it: a trace of the first call guarded on their absence, and the second call traced again)."""
        if self.inputs is None:
            self.inputs = [x.clone() if torch.is_tensor(x) else x for x in state]
            self.going = torch.ones((), dtype=torch.bool, device=state[0].device)
            self._start()
        else:
            for buffer, x in zip(self.inputs, state, strict=True):
                if torch.is_tensor(buffer):
                    buffer.copy_(x)

        def once(step=step):  # one step over the static buffers, and whether the loop goes on after it
            if write is not None:
                go, new, going = step(tuple(self.inputs))
                pairs = [(x, buffer) for buffer, x in zip(self.inputs, new, strict=True) if torch.is_tensor(buffer)]
                write(go, [x for x, _ in pairs] + [going], [buffer for _, buffer in pairs] + [self.going])
                return
            new = step(tuple(self.inputs))
            for buffer, x in zip(self.inputs, new, strict=True):
                if torch.is_tensor(buffer):
                    buffer.copy_(x)
            self.going.copy_(cond(tuple(self.inputs)))

        for n in range(max_steps):
            if n >= self.LAG and not self._went_on(n - self.LAG):
                break
            if self.graph is not None:
                self.graph.replay()
            elif n < self.WARMUP:  # in this call: its body made its constants before the capture
                self._warm_up(once if n or first is None else lambda: once(first))
            else:
                self.graph, self.kept = self._capture(once), (step, cond)  # what the graph reads stays alive
                self.graph.replay()
            self._sent(n, copied=self.graph is not None and self.FLAG_IN_GRAPH)
        return tuple(x.clone() if torch.is_tensor(x) else x for x in self.inputs)

    # the CUDA calls, apart
    def _start(self) -> None:
        self.host_going = torch.ones((), dtype=torch.bool, pin_memory=True)
        self.events = [torch.cuda.Event() for _ in range(self.LAG)]

    def _warm_up(self, once) -> None:  # on a side stream, as capture requires
        stream, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            once()
        stream.wait_stream(side)

    def _capture(self, once):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
            once()
            if self.FLAG_IN_GRAPH:  # the flag's copy to the host a node of the graph, not a launch of its own
                self.host_going.copy_(self.going, non_blocking=True)
        return graph

    def _sent(self, n: int, copied: bool = False) -> None:  # after step n: whether the loop goes on, to the host
        if not copied:  # when it is done
            self.host_going.copy_(self.going, non_blocking=True)
        self.events[n % self.LAG].record()

    def _went_on(self, n: int) -> bool:  # whether the loop went on after step n (or a later one: an ended
        self.events[n % self.LAG].synchronize()  # loop stays ended)
        return bool(self.host_going)


# ---------------------------------------------------------------------- the decoder step as a CUDA graph
class CudaGraphStep:
    """One decoder step (all layers + LM head; the model's forward, or the fused or compiled step of
    `decoding.py`) captured once as a CUDA graph and replayed for every token: one launch instead of hundreds
    of small kernels, which is what bounds decoding speed at small batch.

    Everything the graph reads lives in static buffers owned here: the KVCache's self-attention buffers
    [layers, 2, rows, heads, max_length, head_dim] (attended in full, masked beyond the step index), the
    cross-attention keys/values and the encoder mask (padded to the input's `search.encoder_bucket`, so
    inputs of similar length share a graph), the tokens and the step index, which lives on the device. A model keeps a
    few captured steps, keyed by shapes, dtype, decoding options and its parameters' addresses, so repeated generate() calls
    replay without capturing again. Beam search reorders the buffers in place between steps.

    `capture=False`: the same buffers, the step not captured on its own but run inside the whole loop body's
    graph (`loops`: its `CudaGraphLoop`s), reading its index from the loop's device counter; the encoder's
    n-grams (for encoder_no_repeat_ngram) get a static buffer too (`load_grams`).
    """

    def __init__(self, model, rows: int, max_length: int, encoder_length: int, dtype, device,
                 options: DecodingOptions, capture: bool = True):
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
        self.cache = KVCache(len(layers), cross_kv=cross, buffers=buffers, index=self.index,
                             table=beam_table(rows, max_length, device) if options.attention_kernel else None)

        fn, weights = decode_function(model, options), fused_weights(model) if options.fused else None
        self.vocab = model.get_output_embeddings().weight.shape[0]  # the logits' width (decode_function's float32)

        def run(tokens=self.tokens):
            return fn(model, tokens, self.cache, self.mask if encoder_length else None, weights)

        self.run, self.graph, self.loops, self.grams, self.prefills = run, None, {}, {}, {}
        # whether a call returns its own copy of the logits; False: the graph's output buffer, overwritten by the
        # next call (generate() when nothing keeps a step's scores: no hooks, no caller's processors)
        self.own_logits = True
        if not capture:  # the loop body's graph reorders the whole buffers
            self.cache.written = max_length
            return

        def step():  # (its warm-ups write cache position 0, which the first real step overwrites)
            self.logits = run()

        self.graph = _captured(step, device)
        if isinstance(buffers, list) and rows > 1 and self.cache.table is None:  # per-layer buffers: beam search
            # reorders them in one replay
            self.order = torch.arange(rows, device=device)
            self.reorder_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.reorder_graph, capture_error_mode=CAPTURE_MODE):
                for kv in buffers:  # every position: the unwritten ones are masked, then overwritten
                    kv.copy_(kv.index_select(1, self.order))
            self.cache.reorder = self.reorder  # this cache's reorder (KVCache.reorder: a kernel pair per layer)

    def reorder(self, rows) -> None:
        self.order.copy_(rows)
        self.reorder_graph.replay()

    def prefill(self, model, input_ids, attention_mask, copies: int) -> None:
        """A new batch: the encoder over input_ids [batch, S] (attention_mask [batch, S]) and every layer's
        cross-attention keys and values, repeated `copies` times (beams, samples), written into this step's
        buffers with the encoder mask, as one CUDA graph per batch size and copies (the encoder runs over the
        bucket's length, the added positions masked: they weigh exactly 0), so a call launches one graph
        instead of the encoder's and 2 * layers products' kernels."""
        batch, length = input_ids.shape
        if (batch, copies) not in self.prefills:
            size = min(self.mask.shape[1], model.config.max_position_embeddings)
            ids = torch.full((batch, size), model.config.pad_token_id, dtype=torch.long, device=input_ids.device)
            mask = torch.zeros(batch, size, dtype=torch.long, device=input_ids.device)
            encoder, layers = model.get_encoder(), model.get_decoder().layers

            def run():
                checks, encoder.check_values = encoder.check_values, False  # generate() checked the values;
                try:  # reading them on the host waits for the GPU, which a capture refuses
                    states = encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
                finally:
                    encoder.check_values = checks
                for i, layer in enumerate(layers):
                    for j, x in enumerate(layer.encoder_attn.project_kv(states)):
                        self.cross[i, j, :, :, :size].copy_(x.repeat_interleave(copies, 0) if copies > 1 else x)
                self.mask[:, :size].copy_(mask.repeat_interleave(copies, 0) if copies > 1 else mask)

            self.prefills[batch, copies] = ids, mask, _captured(run, input_ids.device)
        ids, mask, graph = self.prefills[batch, copies]
        ids[:, length:].fill_(model.config.pad_token_id)
        ids[:, :length].copy_(input_ids)
        mask[:, length:].zero_()
        mask[:, :length].copy_(attention_mask)
        graph.replay()

    def load_grams(self, grams):
        """The encoder's n-grams [rows, W, n] in a static buffer of a window per start position in this step's
        encoder bucket (bucket - n + 1; the last window repeated: the same bans), or None."""
        if grams is None:
            return None
        rows, windows, n = grams.shape
        size = self.mask.shape[1] - n + 1
        if n not in self.grams:  # one buffer per n, as long as this step lives (captured loops read it)
            self.grams[n] = torch.empty(rows, size, n, dtype=grams.dtype, device=grams.device)
        buffer = self.grams[n]
        buffer[:, :windows].copy_(grams)
        buffer[:, windows:].copy_(grams[:, -1:].expand(rows, size - windows, n))
        return buffer

    def __call__(self, tokens, index, cache):
        if self.graph is None:  # inside the loop body's graph (or its prefill: a Python int index)
            if torch.is_tensor(index):
                self.index.copy_(index)
            else:
                self.index.fill_(index)
            return self.run(tokens), cache
        self.tokens.copy_(tokens)
        self.index.fill_(index)
        cache.written = index + 1
        self.graph.replay()
        return self.logits.clone() if self.own_logits else self.logits, cache


# ---------------------------------------------------------------------- generate
class GenerationMixin:
    """`generate()` for BlenderbotForConditionalGeneration and BlenderbotForCausalLM (decoder-only: the
    input ids are the decoder prompt)."""

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """transformers' `compute_transition_scores`: each generated token's score, [rows, generated] (0 after
        a beam hypothesis' end), from generate()'s `sequences`, `scores` (or its `logits` with
        `normalize_logits=True`) and, for beam search, `beam_indices` (`blenderbot_mb.scoring.transition_scores`)."""
        out = transition_scores(sequences, scores, beam_indices, normalize_logits)
        return torch.from_numpy(out).to(scores[0].device)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """Replies for a batch of encoder inputs (BlenderbotForCausalLM: continuations of the prompts).

        Settings: the model's `generation_config`, then `generation_config`, then keyword arguments (max_length,
        max_new_tokens, num_beams, do_sample, top_k, ...). `seed=` (an int, or one per input) makes sampling
        repeatable, each sampled reply from its own stream (`blenderbot_mb.search.stream_ids`); a `generator=`
        torch.Generator (else torch's global one) draws the seed when none is given. Hooks: `streamer=`
        (transformers' TextStreamer protocol), `stopping_criteria=`, `stop_strings=` (with `tokenizer=`),
        `max_time=`, `logits_processor=` (callables `(input_ids, scores) -> scores`, after the built-in processors,
        before the sampling warpers).
        `decoder_input_ids=` starts the replies from a prompt. On CUDA devices beam search runs its whole loop body
        (decoder step, logits processors, search bookkeeping, cache reorder) as one replayed CUDA graph per token,
        except for calls that need the host each step (hooks, sampling, `logits_processor=`); greedy search does too
        where the search compiles (compile=, kernels=True), else it replays the decoder step alone, as those calls
        do. `device_loop=True` runs the body's graph for greedy search always, `device_loop=False` replays the step
        alone always, `cuda_graph=False` runs everything eagerly, `device_loop=True` off CUDA runs that loop body
        without host reads, uncaptured. `fused=True` runs the decoder step written for decoding (the default on
        GPUs where the Linear layers are plain; `fused=False` runs the model's forward), `compile=True` (or
        a torch.compile mode) compiles the step, `packed=True` (float32 on the CPU) runs the fused step over weights
        prepared for the row count (see `decoding.py`: the fastest CPU path, at the cost of a second copy of the
        decoder's weights), `freeze=True` (with compile=, on the CPU) compiles the fused step with the weights
        frozen into it, `kernels=True` (NVIDIA GPUs) runs the step as Triton kernels (see `kernels.py`: 8
        kernels per decoder layer; more than 32 rows, or models wider than 1280, run the fused step compiled
        around the Triton attention kernel, faster there); all default to the model's `decoding_options` (see
        `compile_decoding()`, `pack_decoding()`).
        With `compile=` (or `kernels=True` on CUDA) a device loop's search is compiled too, around the step.

        Returns ids `[batch * num_return_sequences, length]` (prompt included), padded after each reply's end;
        with `return_dict_in_generate=True` a GenerateOutput (`sequences_scores` for beam search, `scores`
        with `output_scores=True`).
        """
        generator, cuda_graph = kwargs.pop("generator", None), kwargs.pop("cuda_graph", True)
        device_loop = kwargs.pop("device_loop", None)
        options = self.decoding_options.replace(fused=kwargs.pop("fused", None), compile=kwargs.pop("compile", None),
                                                packed=kwargs.pop("packed", None), freeze=kwargs.pop("freeze", None),
                                                kernels=kwargs.pop("kernels", None))
        decoder_only = not self.config.is_encoder_decoder
        input_ids = generate_inputs(input_ids, kwargs)
        check_inputs(input_ids, attention_mask, self.config, "input_ids")
        device = self.device
        input_ids = torch.as_tensor(input_ids, device=device)
        prompt = input_ids if decoder_only else kwargs.pop("decoder_input_ids", None)
        if prompt is not None and not decoder_only:
            check_inputs(prompt, None, self.config, "decoder_input_ids")
            prompt = torch.as_tensor(decoder_prompt(generation_config or self.generation_config, self.config, kwargs,
                                                    torch.as_tensor(prompt).cpu().numpy(), input_ids.shape[0])[0],
                                     device=device)
        request = prepare(generation_config or self.generation_config, self.config, kwargs,
                          prompt_length=1 if prompt is None else prompt.shape[1])
        if generator is not None and request.seed is not None:
            raise ConfigError("pass seed= or generator=, not both")
        gen, spec = request.gen, request.spec
        if spec.layer_outputs:  # the model's own forward returns them: run it, uncaptured, step by step
            if decoder_only:
                raise ConfigError("output_attentions / output_hidden_states: for the encoder-decoder model only")
            options, cuda_graph = DecodingOptions(fused=False), False
            request.hooks.encoder_width = input_ids.shape[1]
        device_loop = _device_loop(request, device_loop, device, cuda_graph, _compiled_search(options, device))
        ops = TorchOps(device, eager=not device_loop, kernels=options.kernels or top_k_kernel_usable(device))
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
            step, cache = self._decoder_step(None, spec, rows=input_ids.shape[0] * spec.copies,
                                             cuda_graph=cuda_graph, options=options, device_loop=device_loop)
            grams = None
        else:
            if prompt is None:
                prompt = torch.full((input_ids.shape[0], 1), gen.decoder_start_token_id, device=device)
            step, cache = self._decoder_step((input_ids, attention_mask), spec, rows=input_ids.shape[0] * spec.copies,
                                             cuda_graph=cuda_graph, options=options, device_loop=device_loop,
                                             hooks=request.hooks if spec.layer_outputs else None)
            grams = encoder_ngrams(ops, spec.plan, input_ids, spec.copies)
        if isinstance(step, CudaGraphStep):  # no copy of each step's logits where nothing keeps them
            step.own_logits = request.hooks is not None or bool(request.user_processors)
        if device_loop and isinstance(step, CudaGraphStep):  # the loop body as a CUDA graph, kept by the step
            grams = step.load_grams(grams)
            ops.loops, ops.loop_key = step.loops, (spec, None if grams is None else grams.shape)
        processors = build_processors(ops, spec.plan, grams)
        reorder = _reorder
        if device_loop and _compiled_search(options, device):
            ops.compile_body = options.backend  # the search compiled too; the step runs as it is, between its parts
            step, reorder = _opaque(step, reorders=spec.num_beams > 1)
        sequences, length, scores, beams = decode(ops, request, step=step, cache=cache, prompt=prompt,
                                           processors=processors, key=streams, reorder=reorder)
        sequences = sequences[:, :int(length)]
        if not gen.return_dict_in_generate:
            return sequences
        return generate_output(request, sequences, length, scores, beams)

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

    def kernel_decoding(self, enabled: bool = True, compile_search: bool = True):
        """Make later generate() calls run the decoder step written with Triton kernels (`kernels=True`, NVIDIA
        GPUs; refused here, with a ConfigError, where they don't run). `compile_search=False`: a device loop's
        search stays eager (compiling it costs seconds for each new set of search settings, which a server
        meets often); the step compiles still for each new shape of more than 32 rows. `enabled=False` goes back to
        the default step. Returns the model."""
        if not enabled:
            self.decoding_options = DecodingOptions()
            return self
        options = DecodingOptions(fused=True, kernels=True, compile_search=compile_search)
        options.for_rows(self, 1)  # what the kernels don't run is refused now, not at the first reply
        self.decoding_options = options
        return self

    def pack_decoding(self, packed: bool = True, compile_one_row: bool | str = False):
        """Make later generate() calls on the CPU run the fused step over weights prepared for the row count
        (`packed=True`, float32; see `decoding.py`); `packed=False` goes back to the default step.
        `compile_one_row=True` (or a torch.compile mode; True: "max-autotune-no-cudagraphs") runs one-row
        decoding (greedy or sampling, one reply) with the step compiled and the weights frozen in, the fastest
        for it on the development CPU (its first call of each shape compiles: tens of seconds for the 400M
        shape). Returns the model."""
        mode = compile_one_row if isinstance(compile_one_row, str) else \
            "max-autotune-no-cudagraphs" if packed and compile_one_row else "default"
        self.decoding_options = DecodingOptions(fused=packed or None, packed=packed,
                                                compile=bool(packed and compile_one_row),
                                                mode=mode, freeze=bool(packed and compile_one_row))
        return self

    def _decoder_step(self, encoder_inputs, spec, rows: int, cuda_graph: bool,
                      options: DecodingOptions = DecodingOptions(), device_loop: bool = False, hooks=None):
        """(step, cache): `step(tokens [rows], index, cache) -> (float32 logits [rows, vocab], cache)` over a
        KVCache preallocated to max_length, after the encoder ran over `encoder_inputs` (input_ids,
        attention_mask; None: decoder-only) and the cross-attention keys/values were projected; on CUDA
        devices the step is a replayed CUDA graph (and so is that prefill: CudaGraphStep.prefill), else run as
        it is. `device_loop`: for TorchOps(eager=False), the index may be a device counter [1], and beam search
        reorders the whole buffers; on CUDA the step is not captured on its own (the loop body is)."""
        from .modeling import KVCache

        layers = self.get_decoder().layers
        dtype, device = self.dtype, self.device
        options = options.for_rows(self, rows)
        # refreshed each call (weights may change in place); packed ones when a weight's version changed
        weights = fused_weights(self, options.packed, rows) if options.fused and not options.freeze else None
        if _graphs(device, cuda_graph):
            length = encoder_inputs[0].shape[1] if encoder_inputs is not None else 0
            graph = self._graph_step(rows, spec.max_length, length, dtype, device, options,
                                     capture=not device_loop)
            if encoder_inputs is not None:
                graph.prefill(self, *encoder_inputs, spec.copies)
            return graph, graph.cache
        cross = encoder_mask = None
        if encoder_inputs is not None:
            input_ids, attention_mask = encoder_inputs
            encoded = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                         output_attentions=spec.output_attentions,
                                         output_hidden_states=spec.output_hidden_states)
            if hooks is not None:  # output_attentions / output_hidden_states
                hooks.record_encoder(encoded.attentions, encoded.hidden_states)
            states = encoded.last_hidden_state
            cross = self._cross_kv(states, spec.copies)
            if not bool(attention_mask.all()):
                encoder_mask = attention_mask.repeat_interleave(spec.copies, 0)
        attn = layers[0].self_attn
        buffers = cache_buffers(len(layers), (2, rows, attn.num_heads, spec.max_length, attn.head_dim), dtype,
                                device, per_layer=options.compile)
        if not (options.fused or options.compile or device_loop):  # the model's forward, written positions
            cache = KVCache(len(layers), cross_kv=cross, buffers=buffers)

            def step(tokens, index, cache):
                cache.index, cache.written = index, index + 1
                if hooks is None:
                    return self._next_logits(tokens, cache, encoder_mask), cache
                out = self.get_decoder()(input_ids=tokens[:, None], encoder_attention_mask=encoder_mask,
                                         past_key_values=cache, use_cache=True, return_dict=True,
                                         output_attentions=spec.output_attentions,
                                         output_hidden_states=spec.output_hidden_states)
                record_layers(TorchOps(tokens.device), spec, hooks, index, out.attentions or (),
                              out.cross_attentions or (), out.hidden_states or ())
                return self._lm_logits(out.last_hidden_state[:, -1]).float(), cache

            return step, cache
        if options.compile and cross is not None:  # a few encoder lengths to compile for, not one per input
            cross, encoder_mask = bucketed(cross, encoder_mask,
                                           encoder_bucket(encoder_inputs[0].shape[1],
                                                          self.config.max_position_embeddings))
        fn, position = decode_function(self, options), torch.zeros(1, dtype=torch.long, device=device)
        cache = KVCache(len(layers), cross_kv=cross, buffers=buffers, index=position,
                        table=beam_table(rows, spec.max_length, device) if options.attention_kernel else None)
        cache.written = spec.max_length  # device_loop: beam search reorders every position

        def device_step(tokens, index, cache):
            if torch.is_tensor(index):
                position.copy_(index)
            else:
                position.fill_(index)
                if not device_loop:
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

    def _graph_step(self, rows, max_length, encoder_length, dtype, device, options, capture: bool = True,
                    keep: int = 16) -> CudaGraphStep:
        """A captured step for these shapes, reused while the parameters stay where they are. At most `keep`
        are kept (a server sees a few batch shapes and input-length buckets over and over: capturing again
        costs far more than a step), least recently used out first, and their cache buffers take at most a
        quarter of the device's memory."""
        steps = self.__dict__.setdefault("_cuda_graph_steps", {})
        bucket = encoder_bucket(encoder_length, self.config.max_position_embeddings)
        if options.attention_kernel and (options.compile or options.kernels):  # compiled (or captured) per
            # shape, and the attention kernel reads no further than the step index: one cache length for every
            max_length = max(max_length, self.config.max_position_embeddings)  # max_length, so a server
            # compiles or captures once per rows and input length bucket
        fused = [t for pair in self.__dict__.get("_fused_qkv", ()) for t in pair] if options.fused else []
        where = tuple(t.data_ptr() for t in (*model_tensors(self), *fused))
        key = (rows, max_length, bucket, dtype, str(device), where, options, capture)
        if key not in steps:
            budget = torch.cuda.get_device_properties(device).total_memory // 4

            def size(k):  # bytes of a step's self- and cross-attention buffers: rows * (L + bucket) * d * layers * 2
                return k[0] * (k[1] + k[2]) * self.config.d_model * len(self.get_decoder().layers) * 2 * \
                    torch.tensor([], dtype=k[3]).element_size()

            while steps and (len(steps) >= keep or sum(size(k) for k in steps) + size(key) > budget):
                steps.pop(next(iter(steps)))
            steps[key] = CudaGraphStep(self, rows=rows, max_length=max_length, encoder_length=bucket, dtype=dtype,
                                       device=device, options=options, capture=capture)
        steps[key] = steps.pop(key)  # most recently used last
        return steps[key]

    def _next_logits(self, tokens, cache, encoder_mask):
        """Float32 logits [rows, vocab] of the token after `tokens` [rows] (at the cache's write index)."""
        hidden = self.get_decoder()(input_ids=tokens[:, None], encoder_attention_mask=encoder_mask,
                                    past_key_values=cache, use_cache=True, return_dict=True).last_hidden_state
        return self._lm_logits(hidden[:, -1]).float()


def _captured(fn, device) -> torch.cuda.CUDAGraph:
    """`fn` run twice on a side stream (lazy initializations, as capture requires), then captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
        fn()
    return graph



def beam_table(rows: int, max_length: int, device):
    """The cache rows each position of each row is read from (kernels.attention's `table`): each row's own at
    first; every step writes its own row at the new position, and beam search reorders the table."""
    return torch.arange(rows, dtype=torch.int32, device=device)[:, None].repeat(1, max_length)


def _device_loop(request, asked, device, cuda_graph: bool, compiled_search: bool = False) -> bool:
    """Whether the search runs as TorchOps(eager=False) (on CUDA with cuda_graph: its loop body captured as
    one CUDA graph): `asked` (generate's device_loop=; None: on CUDA devices with cuda_graph, beam search, where
    it measured 0.96x the step-only graph's time on an H100, and greedy search where the search compiles
    (`compiled_search`: compile=, or kernels=True), 0.97-0.99x, against 1.02x with the search eager), unless
    the call needs the host at every step: host hooks (streamer, stopping criteria, stop strings, max_time,
    per-step scores), sampling (its per-row CPU generators) or a caller's logits_processor; those run the eager
    loop."""
    if request.hooks is not None or request.spec.streams_per_input or request.user_processors:
        return False
    if asked is not None:
        return bool(asked)
    return _graphs(device, cuda_graph) and (request.spec.beam or compiled_search)


def top_k_kernel_usable(device) -> bool:
    """Whether the search's long top-k runs kernels.top_k on this device by default (it does with kernels=True):
    an NVIDIA GPU of compute capability 8 or more, Triton installed, and not a process where TensorFlow was
    imported before Triton (loading Triton after it aborts the process). Besides its speed (16 against 55 us
    for beam search's top 20 of 80,080 values on an H100), its ties come out lower index first, as in the other
    backends; torch.topk on CUDA orders tied values otherwise."""
    if not TOP_K_KERNEL or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return not tensorflow_before_triton() and importlib.util.find_spec("triton") is not None


def _compiled_search(options: DecodingOptions, device) -> bool:
    """Whether a device loop's search goes through torch.compile (around the step): with compile=, or with
    kernels=True on CUDA."""
    return COMPILE_SEARCH and options.compile_search and \
        bool(options.compile or (options.kernels and device.type == "cuda"))


def _opaque(step, reorders: bool):
    """The decoder step as torch.compile leaves it, and beam search's reorder of its cache: run as they are (a
    captured, compiled or kernel step already), inside the compiled loop body around them. A step of a captured
    loop (`CudaGraphStep(capture=False)`) is one operator of the body's graph (`_loop_step`), and so is the
    reorder of its beam table (`_reorder_table`); otherwise (beam search over the buffers themselves, uncaptured
    steps) the step is a graph break. Returns (step, reorder)."""
    if STEP_OPERATOR and isinstance(step, CudaGraphStep) and step.graph is None and (
            step.cache.table is not None or not reorders):
        _LOOP_STEPS[id(step)] = step

        def op(tokens, index, cache):
            if cache.table is None:
                return _loop_step(tokens, index, id(step)), cache
            return _loop_step_table(tokens, index, cache.table, id(step)), cache

        def reorder(cache, rows):
            _reorder_table(cache.table, rows)
            return cache

        return op, reorder

    @torch.compiler.disable
    def run(tokens, index, cache):
        return step(tokens, index, cache)

    return run, _reorder


# The operators of a compiled loop body. Each names every tensor of the body's graph that it writes: the
# graph's own writes to the beam table are ordered around them by that alone. (The reorder traced into the
# graph after the step's write lost that order: inductor gathered the table's rows in place.)
_LOOP_STEPS = weakref.WeakValueDictionary()  # id -> CudaGraphStep


@torch.library.custom_op("blenderbot_mb::loop_step", mutates_args=())
def _loop_step(tokens: torch.Tensor, index: torch.Tensor, step: int) -> torch.Tensor:
    """The float32 logits [rows, vocab] of the captured loop's step `step` (an id in _LOOP_STEPS) for `tokens`
    [rows] at `index` [1]. It writes the step's cache, which nothing else in the loop body reads."""
    with _below_autograd():
        return _LOOP_STEPS[step](tokens, index, _LOOP_STEPS[step].cache)[0]


def _below_autograd():
    """The dispatcher's state an operator's step runs in, whether the operator was called from a compiled graph
    or eagerly (a compiled step guards on its tensors' dispatch keys, which the two calls would see differ: it
    compiled again). A PyTorch without that guard runs it as it is (at worst, a compile more)."""
    return getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", contextlib.nullcontext)()


@torch.library.custom_op("blenderbot_mb::loop_step_table", mutates_args=("table",))
def _loop_step_table(tokens: torch.Tensor, index: torch.Tensor, table: torch.Tensor, step: int) -> torch.Tensor:
    """_loop_step of a step whose attention reads its cache through a beam table and sets each row's entry at
    the index: `table`, the one the compiled graph gives (its own copy of the step's, unless in place)."""
    step = _LOOP_STEPS[step]
    own, step.cache.table = step.cache.table, table
    try:
        with _below_autograd():
            return step(tokens, index, step.cache)[0]
    finally:
        step.cache.table = own


@torch.library.custom_op("blenderbot_mb::reorder_table", mutates_args=("table",))
def _reorder_table(table: torch.Tensor, rows: torch.Tensor) -> None:
    """Beam search: row i of the beam table takes row `rows[i]`'s (KVCache.reorder), in place."""
    from .kernels import reorder_rows  # (a beam table is read by kernels.attention: Triton is there)

    reorder_rows(table, rows)


def _logits_like(tokens, step: int):  # the operators' fake: their logits' shape and dtype
    return tokens.new_empty((tokens.shape[0], _LOOP_STEPS[step].vocab), dtype=torch.float32)


_loop_step.register_fake(lambda tokens, index, step: _logits_like(tokens, step))
_loop_step_table.register_fake(lambda tokens, index, table, step: _logits_like(tokens, step))


def _graphs(device, cuda_graph: bool) -> bool:
    """Whether generate() captures CUDA graphs (the step, or the device loop's body)."""
    return device.type == "cuda" and cuda_graph


def _reorder(cache, rows):
    cache.reorder(rows)
    return cache

