"""Running an ONNX export on onnxruntime, with this package's own search (`blenderbot_mb.search`).

    >>> from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration
    >>> model = ORTBlenderbotForConditionalGeneration.from_pretrained("bb-onnx")        # doctest: +SKIP
    >>> model.generate([[6950, 1085, 2]], num_beams=10)                                 # doctest: +SKIP

Greedy search, sampling and beam search, n-gram blocking on both sides, min length and forced eos are the
core's, run over NumPy arrays (`search_ops.NumpyOps`), so the settings and the tokens are those of the
PyTorch backend in float32 (sampling draws from NumPy's generator, so a seed gives other samples than
PyTorch's). The decoder's first step runs decoder_model.onnx, the later ones decoder_with_past_model.onnx;
the self-attention cache grows by one position per step and beam search gathers its rows.
"""

from __future__ import annotations

import os

import numpy as np

from .._backends import require_module
from ..errors import InputError
from .onnx import DECODER_FILE, DECODER_WITH_PAST_FILE, ENCODER_FILE, SUBFOLDER, past_names


class ORTBlenderbotForConditionalGeneration:
    """The three graphs of an ONNX export in onnxruntime sessions, with `generate` and `__call__` (logits).

    The graphs are read from the folder's `onnx/` subfolder (the export's layout) or, without one, from the
    folder itself."""

    def __init__(self, folder: str, config, generation_config, providers=None, session_options=None):
        ort = require_module("onnxruntime", "export", "Running an ONNX export")
        self.config, self.generation_config = config, generation_config
        self.layers = config.decoder_layers
        if os.path.isdir(os.path.join(folder, SUBFOLDER)):  # the export's layout; else the graphs at the top
            folder = os.path.join(folder, SUBFOLDER)
        missing = [f for f in (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
                   if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise InputError(f"{folder} is not an ONNX export of this package: it lacks {', '.join(missing)}")

        def session(name):
            return ort.InferenceSession(os.path.join(folder, name), sess_options=session_options,
                                        providers=providers or ["CPUExecutionProvider"])

        self.encoder, self.decoder, self.decoder_with_past = (
            session(f) for f in (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, providers=None, session_options=None):
        from ..config import BlenderbotConfig
        from ..generation_config import GenerationConfig

        folder = os.fspath(folder)
        config = BlenderbotConfig.from_pretrained(folder)
        return cls(folder, config, GenerationConfig.from_pretrained(folder, config), providers, session_options)

    # ------------------------------------------------------------------ the graphs
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[batch, src] int64 ids and mask -> encoder states [batch, src, d_model]."""
        return self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None) -> np.ndarray:
        """Logits [batch, tgt, vocab] of `decoder_input_ids` (teacher forcing), as the PyTorch model's."""
        from ..search import check_inputs

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        check_inputs(ids, mask, self.config)
        if decoder_input_ids is None:
            raise InputError("pass decoder_input_ids (the reply so far, starting with the decoder start token)")
        dec = np.asarray(decoder_input_ids, dtype=np.int64)
        check_inputs(dec, None, self.config, "decoder_input_ids")
        states = self.encode(ids, mask)
        return self.decoder.run(["logits"], {"encoder_attention_mask": mask, "input_ids": dec,
                                             "encoder_hidden_states": states})[0]

    def _step(self, states, mask):
        """The core's step(tokens [rows], index, cache) -> (float32 logits [rows, vocab], cache)."""
        past_in = past_names(self.layers)
        self_in = past_names(self.layers, cross=False)

        def step(tokens, index, cache):
            ids = np.asarray(tokens, dtype=np.int64)[:, None]
            if cache is None:  # the first step also computes the cross-attention keys/values
                out = self.decoder.run(None, {"encoder_attention_mask": mask, "input_ids": ids,
                                              "encoder_hidden_states": states})
                return out[0][:, -1].astype(np.float32), dict(zip(past_in, out[1:], strict=True))
            out = self.decoder_with_past.run(None, {"encoder_attention_mask": mask, "input_ids": ids, **cache})
            return out[0][:, -1].astype(np.float32), {**cache, **dict(zip(self_in, out[1:], strict=True))}

        return step

    @staticmethod
    def _reorder(cache, rows):
        """Follow the surviving beams: every cached array takes the rows `rows` [rows] of the last step."""
        return None if cache is None else {k: v[np.asarray(rows)] for k, v in cache.items()}

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs) -> np.ndarray:
        """Replies for a batch of encoder inputs, with the settings of `generation_config` (default: the
        export's generation_config.json) and keyword arguments, as the PyTorch backend's `generate`.
        `seed=` makes sampling repeatable. Returns int64 ids [batch * num_return_sequences, length] that
        start with the decoder start token, padded after each reply's end."""
        from ..search import (
            build_processors,
            check_inputs,
            decode,
            encoder_ngrams,
            infer_attention_mask,
            prepare,
            stream_ids,
        )
        from ..search_ops import NumpyOps

        request = prepare(generation_config or self.generation_config, self.config, kwargs)
        gen, spec, ops = request.gen, request.spec, NumpyOps()
        ids = np.asarray(input_ids)
        ids = (ids[None] if ids.ndim == 1 else ids).astype(np.int64)
        mask = infer_attention_mask(ops, ids, gen) if attention_mask is None else np.asarray(attention_mask)
        mask = (mask[None] if mask.ndim == 1 else mask).astype(np.int64)
        check_inputs(ids, mask, self.config)
        states = self.encode(ids, mask)
        copies = spec.copies
        step = self._step(np.repeat(states, copies, 0), np.repeat(mask, copies, 0))
        processors = build_processors(ops, spec.plan, encoder_ngrams(ops, spec.plan, ids.astype(np.int32), copies))
        prompt = np.full((ids.shape[0], 1), gen.decoder_start_token_id, dtype=np.int32)
        seed = request.seed if request.seed is not None else int(np.random.SeedSequence().generate_state(
            1, np.uint64)[0])
        names = stream_ids(ops, spec, seed, ids.shape[0])  # [rows, 6] or None: not sampling
        sequences, length, _, _ = decode(ops, request, step=step, cache=None, prompt=prompt, processors=processors,
                                      key=None if names is None else ops.streams(names), reorder=self._reorder)
        return np.asarray(sequences)[:, :int(length)].astype(np.int64)
