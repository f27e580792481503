"""ONNX export in the layout that Hugging Face optimum's `ORTModelForSeq2SeqLM` and transformers.js both load
by default: config.json, generation_config.json and the tokenizer files at the top of the folder, the graphs
in its `onnx/` subfolder (where transformers.js looks; optimum finds them there too).

Three graphs, exported from the PyTorch backend with the TorchScript exporter, every batch and sequence
axis dynamic, and the two decoders merged into a fourth:

    encoder_model.onnx            input_ids, attention_mask [batch, src]          -> last_hidden_state
    decoder_model.onnx            encoder_attention_mask [batch, src], input_ids [batch, tgt],
                                  encoder_hidden_states [batch, src, d]           -> logits, present.{i}.*
    decoder_with_past_model.onnx  encoder_attention_mask, input_ids [batch, 1],
                                  past_key_values.{i}.{decoder,encoder}.{key,value} -> logits,
                                  present.{i}.decoder.{key,value}

Keys and values are [batch, heads, time, head_dim]; `decoder` ones are the self-attention cache
(grown by one per step), `encoder` ones the cross-attention keys/values (computed once by the first
decoder call). Graphs above 2 GB keep their weights in `<graph>.onnx_data` beside them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from .._backends import require_module

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"
DECODER_MERGED_FILE = "decoder_model_merged.onnx"
SUBFOLDER = "onnx"  # the graphs' folder inside an exported model folder
OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1


def past_names(layers: int, prefix: str = "past_key_values", cross: bool = True) -> list[str]:
    """`{prefix}.{i}.decoder.key, .decoder.value[, .encoder.key, .encoder.value]` for every layer, in order."""
    parts = ("decoder.key", "decoder.value") + (("encoder.key", "encoder.value") if cross else ())
    return [f"{prefix}.{i}.{p}" for i in range(layers) for p in parts]


def _wrappers(model):
    """torch modules with the graphs' flat signatures, calling the model's own encoder and decoder."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def logits(self, hidden):  # [batch, tgt, d] -> [batch, tgt, vocab]
            return self.model.lm_head(hidden) + self.model.final_logits_bias.to(hidden.dtype)

    class Encoder(Graph):
        def forward(self, input_ids, attention_mask):
            return self.model.get_encoder()(input_ids, attention_mask, return_dict=True).last_hidden_state

    class Decoder(Graph):
        def forward(self, encoder_attention_mask, input_ids, encoder_hidden_states):
            out = self.model.get_decoder()(input_ids, encoder_hidden_states=encoder_hidden_states,
                                           encoder_attention_mask=encoder_attention_mask, use_cache=True,
                                           return_dict=True)
            return (self.logits(out.last_hidden_state), *[t for layer in out.past_key_values for t in layer])

    class DecoderWithPast(Graph):
        def forward(self, encoder_attention_mask, input_ids, *past):
            cache = tuple(tuple(past[i:i + 4]) for i in range(0, len(past), 4))
            # the layers take the cross-attention K/V from the cache; the states only have to exist, with
            # the encoder's [batch, src] leading shape that the mask is checked against
            states = encoder_attention_mask[:, :, None].to(past[0].dtype)
            out = self.model.get_decoder()(input_ids, encoder_hidden_states=states,
                                           encoder_attention_mask=encoder_attention_mask, past_key_values=cache,
                                           use_cache=True, return_dict=True)
            return (self.logits(out.last_hidden_state), *[t for layer in out.past_key_values for t in layer[:2]])

    # in eval mode: torch.onnx.export gives the wrapper its mode back afterwards, and a wrapper in training
    # mode would leave the model in it (dropout on)
    return Encoder().eval(), Decoder().eval(), DecoderWithPast().eval()


def export_folder(src: str, dst: str, allow_pickle: bool = False, opset: int = OPSET) -> list[str]:
    """Export the model folder `src` (loaded with the PyTorch backend, float32) into folder `dst`: the graphs
    into `dst/onnx/`, the configs beside that folder. Returns the files written, relative to dst."""
    from .._backends import require

    require("torch")
    from ..torch import BlenderbotForConditionalGeneration
    from . import save_configs

    model = BlenderbotForConditionalGeneration.from_pretrained(src, allow_pickle=allow_pickle)
    written = export_onnx(model, os.path.join(dst, SUBFOLDER), opset=opset)
    # transformers.js reads its loading options from config.json: the float32 graphs (in a browser it would
    # look for int8 ones by default) and which graphs keep their weights in a `_data` file beside them
    js_config = {"dtype": "fp32", "use_external_data_format": {name: 1 for name in written
                                                               if name + "_data" in written}}
    save_configs(src, dst, **{"transformers.js_config": js_config})
    return [f"{SUBFOLDER}/{name}" for name in written]


def export_onnx(model, folder: str | os.PathLike, opset: int = OPSET, merged: bool = True) -> list[str]:
    """Write the three graphs of `model` (a PyTorch BlenderbotForConditionalGeneration) into `folder`, and
    (`merged`) the merged decoder, which optimum and transformers.js load and this package's runtime does not.

    Returns the file names written. The model is exported in its own dtype, on CPU, in eval mode.
    """
    import torch

    onnx = require_module("onnx", "export", "ONNX export")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model = model.eval().cpu()
    cfg = model.config
    layers, heads = cfg.decoder_layers, cfg.decoder_attention_heads
    head_dim = cfg.d_model // heads
    batch, src, tgt = 2, 5, 3
    ids = torch.full((batch, src), 4, dtype=torch.long)
    mask = torch.ones((batch, src), dtype=torch.long)
    encoder, decoder, decoder_with_past = _wrappers(model)
    float_type = next(model.parameters()).dtype
    states = torch.zeros((batch, src, cfg.d_model), dtype=float_type)
    kv = torch.zeros((batch, heads, tgt, head_dim), dtype=float_type)
    cross = torch.zeros((batch, heads, src, head_dim), dtype=float_type)

    b, s, t = "batch_size", "encoder_sequence_length", "decoder_sequence_length"
    past_t = "past_decoder_sequence_length"
    present_self, present_cross = past_names(layers, "present"), past_names(layers, "present")
    present_self = [n for n in present_self if ".decoder." in n]
    present_cross = [n for n in present_cross if ".encoder." in n]
    past = past_names(layers)
    graphs = [
        (ENCODER_FILE, encoder, (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state"],
         {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "last_hidden_state": {0: b, 1: s}}),
        (DECODER_FILE, decoder, (mask, ids[:, :tgt], states),
         ["encoder_attention_mask", "input_ids", "encoder_hidden_states"], ["logits", *past_names(layers, "present")],
         {"encoder_attention_mask": {0: b, 1: s}, "input_ids": {0: b, 1: t}, "encoder_hidden_states": {0: b, 1: s},
          "logits": {0: b, 1: t}, **{n: {0: b, 2: t} for n in present_self},
          **{n: {0: b, 2: s} for n in present_cross}}),
        (DECODER_WITH_PAST_FILE, decoder_with_past,
         (mask, ids[:, :1], *[kv if ".decoder." in n else cross for n in past]),
         ["encoder_attention_mask", "input_ids", *past], ["logits", *present_self],
         {"encoder_attention_mask": {0: b, 1: s}, "input_ids": {0: b}, "logits": {0: b},
          **{n: {0: b, 2: past_t if ".decoder." in n else s} for n in past},
          **{n: {0: b, 2: f"{past_t} + 1"} for n in present_self}}),
    ]
    written, sizes = [], {}
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory(dir=folder) as scratch:
        warnings.simplefilter("ignore")  # tracer warnings: the input checks are constant in the graphs
        for name, module, args, inputs, outputs, axes in graphs:
            raw_folder = os.path.join(scratch, name)  # above 2 GB, torch writes one file per weight here
            os.makedirs(raw_folder)
            torch.onnx.export(module, args, os.path.join(raw_folder, name), input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
            sizes[name] = sum(os.path.getsize(os.path.join(raw_folder, f)) for f in os.listdir(raw_folder))
            written += _gather(raw_folder, name, folder, sizes[name])
            shutil.rmtree(raw_folder)  # the disk holds one raw graph at a time (10 GB for the 3B decoder)
    if not merged:
        return written
    graph = merge_decoders(onnx.load(os.path.join(folder, DECODER_FILE)),
                           onnx.load(os.path.join(folder, DECODER_WITH_PAST_FILE)), layers)
    size = max(sizes[DECODER_FILE], sum(len(t.raw_data) for t in graph.graph.initializer))
    written += _save(graph, os.path.join(folder, DECODER_MERGED_FILE), size)
    return written


def _gather(raw_folder: str, name: str, folder: str, size: int) -> list[str]:
    """Move graph `name`, as torch wrote it into raw_folder, into folder. Above 2 GB torch writes each weight
    into a file of its own: those are concatenated into one `<name>_data`, streamed tensor by tensor, and the
    graph is pointed at it (the weights are never parsed). A graph in one file moves as it is, unless it is
    above PROTOBUF_LIMIT."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = onnx.load(os.path.join(raw_folder, name), load_external_data=False)
    external = [t for t in graph.graph.initializer if uses_external_data(t)]
    if not external:
        if size > PROTOBUF_LIMIT:
            return _save(graph, os.path.join(folder, name), size)
        os.replace(os.path.join(raw_folder, name), os.path.join(folder, name))
        return [name]
    data_name = name + "_data"
    with open(os.path.join(folder, data_name), "wb") as out:
        for tensor in external:
            info = ExternalDataInfo(tensor)
            out.write(b"\0" * (-out.tell() % 4096))  # page-aligned, so that runtimes can map the weights
            offset = out.tell()
            with open(os.path.join(raw_folder, info.location), "rb") as f:
                f.seek(info.offset or 0)
                out.write(f.read() if info.length is None else f.read(info.length))
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", out.tell() - offset)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(graph, os.path.join(folder, name))
    return [name, data_name]


def _save(model, path: str, size: int) -> list[str]:
    """Save a graph in one file when it fits protobuf's 2 GB (`size`: its bytes), else with its weights in one
    `<file>_data` beside it."""
    import onnx

    name = os.path.basename(path)
    if size <= PROTOBUF_LIMIT:
        onnx.save_model(model, path)
        return [name]
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=name + "_data",
                    size_threshold=1024)
    return [name, name + "_data"]


def merge_decoders(decoder, decoder_with_past, layers: int):
    """One graph for both decoders, as optimum's and transformers.js's `decoder_model_merged.onnx`: an `If` on
    the input `use_cache_branch` ([1] bool) runs the decoder with past (true) or without (false). Weights
    the two graphs share are stored once; with past, the encoder presents pass the cached ones through."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    shared, outer = {}, []  # content digest -> outer initializer name
    for graph in (decoder.graph, decoder_with_past.graph):
        rename, inner = {}, []
        for init in graph.initializer:
            if len(init.dims) == 0 or (len(init.dims) == 1 and init.data_type in (6, 7)):
                inner.append(onnx.TensorProto())  # small shape constants stay in their branch
                inner[-1].CopyFrom(init)
                continue
            data = init.raw_data or numpy_helper.to_array(init).tobytes()
            digest = hashlib.sha1(data + bytes(str((list(init.dims), init.data_type)), "ascii")).digest()
            if digest not in shared:
                shared[digest] = f"shared.{len(shared)}.{init.name}"
                outer.append(onnx.TensorProto())
                outer[-1].CopyFrom(init)
                outer[-1].name = shared[digest]
            rename[init.name] = shared[digest]
        for node in graph.node:
            node.input[:] = [rename.get(x, x) for x in node.input]
        del graph.initializer[:]
        graph.initializer.extend(inner)
    with_past = decoder_with_past.graph
    for i in range(layers):  # the cross-attention cache does not change: pass it through
        for part in ("key", "value"):
            with_past.node.append(helper.make_node("Identity", [f"past_key_values.{i}.encoder.{part}"],
                                                   [f"present.{i}.encoder.{part}"]))
    out_names = [o.name for o in decoder.graph.output]
    typed = {o.name: o for o in [*with_past.output, *with_past.input]}
    with_past_outputs = [typed[n] if n in typed else
                         typed[n.replace("present", "past_key_values")] for n in out_names]
    with_past_outputs = [helper.make_tensor_value_info(n, o.type.tensor_type.elem_type, None)
                         for n, o in zip(out_names, with_past_outputs, strict=True)]
    branches = {name: helper.make_graph(list(g.node), name, [], outputs, initializer=list(g.initializer))
                for name, g, outputs in (("with_past", with_past, with_past_outputs),
                                         ("no_past", decoder.graph, [helper.make_tensor_value_info(
                                             o.name, o.type.tensor_type.elem_type, None)
                                             for o in decoder.graph.output]))}
    switch = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], out_names, then_branch=branches["with_past"],
                            else_branch=branches["no_past"])
    inputs = [*decoder.graph.input, *[x for x in with_past.input if x.name.startswith("past_key_values")], switch]
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in decoder.graph.output]
    graph = helper.make_graph([node], "merged", inputs, outputs, initializer=outer)
    # the decoders' IR version, not the newest one this onnx writes: older runtimes (onnxruntime-node in
    # transformers.js) refuse a newer IR version than they know
    return helper.make_model(graph, opset_imports=list(decoder.opset_import), producer_name="blenderbot-mb",
                             ir_version=decoder.ir_version)
