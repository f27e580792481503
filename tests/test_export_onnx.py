"""ONNX export: the three graphs give the PyTorch backend's logits and caches at other batch and sequence
sizes than they were traced with, carry optimum's names, and (where optimum installs) load in
optimum's ORTModelForSeq2SeqLM, whose greedy tokens equal ours."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import check_info_and_refusal, make_config, random_weights, write_checkpoint

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from blenderbot_mb.export import export_model  # noqa: E402
from blenderbot_mb.export.onnx import export_onnx, past_names  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

OPTIMUM = os.environ.get("BLENDERBOT_MB_OPTIMUM_PATH")  # a folder with optimum-onnx + transformers 4.x (nox)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export(tmp_path_factory, "odd")


def export(tmp_path_factory, name):
    config = make_config(name)
    src = write_checkpoint(tmp_path_factory.mktemp("src"), config, random_weights(config, seed=3),
                           generation={"num_beams": 2, "max_length": 12, "no_repeat_ngram_size": 2})
    dst = str(tmp_path_factory.mktemp("out") / "onnx")
    export_model(src, dst, to="onnx")
    return config, src, dst, BlenderbotForConditionalGeneration.from_pretrained(src)


def inputs(config, batch=3, src_len=11, tgt_len=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, config.vocab_size, (batch, src_len))
    mask = np.ones_like(ids)
    mask[1, 7:], ids[1, 7:] = 0, config.pad_token_id
    dec = rng.integers(4, config.vocab_size, (batch, tgt_len))
    dec[:, 0] = config.decoder_start_token_id
    return ids, mask, dec


def graph(folder, name):
    """An exported graph's path: the graphs are in the export's onnx/ subfolder."""
    return os.path.join(folder, "onnx", name)


def test_files_and_names(exported):
    config, _, dst, _ = exported
    check_info_and_refusal(dst, "an ONNX")
    assert set(os.listdir(dst)) == {"onnx", "config.json", "generation_config.json"}
    assert set(os.listdir(os.path.join(dst, "onnx"))) == {
        "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx"}
    names = lambda s, io: [x.name for x in getattr(s, f"get_{io}")()]  # noqa: E731
    enc = ort.InferenceSession(graph(dst, "encoder_model.onnx"))
    dec = ort.InferenceSession(graph(dst, "decoder_model.onnx"))
    past = ort.InferenceSession(graph(dst, "decoder_with_past_model.onnx"))
    layers = config.decoder_layers
    assert names(enc, "inputs") == ["input_ids", "attention_mask"]
    assert names(enc, "outputs") == ["last_hidden_state"]
    assert names(dec, "inputs") == ["encoder_attention_mask", "input_ids", "encoder_hidden_states"]
    assert names(dec, "outputs") == ["logits", *past_names(layers, "present")]
    assert names(past, "inputs") == ["encoder_attention_mask", "input_ids", *past_names(layers)]
    assert names(past, "outputs") == ["logits", *past_names(layers, "present", cross=False)]
    merged = ort.InferenceSession(graph(dst, "decoder_model_merged.onnx"))
    assert names(merged, "inputs") == [*names(dec, "inputs"), *past_names(layers), "use_cache_branch"]
    assert names(merged, "outputs") == names(dec, "outputs")
    for s in (enc, dec, past):  # batch (and sequence) axes are symbolic, not the traced sizes
        assert all(isinstance(x.shape[0], str) for x in s.get_inputs())


def test_graphs_match_pytorch(exported):
    config, _, dst, model = exported
    ids, mask, dec = inputs(config)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(dec), use_cache=True)
    enc = ort.InferenceSession(graph(dst, "encoder_model.onnx"))
    first = ort.InferenceSession(graph(dst, "decoder_model.onnx"))
    step = ort.InferenceSession(graph(dst, "decoder_with_past_model.onnx"))
    states = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(states, ref.encoder_last_hidden_state.numpy(), atol=1e-5, rtol=0)
    out = first.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, :4], "encoder_hidden_states": states})
    np.testing.assert_allclose(out[0], ref.logits[:, :4].numpy(), atol=1e-5, rtol=0)
    past = dict(zip(past_names(config.decoder_layers), out[1:], strict=True))
    for t in (4, 5):  # two steps: the self-attention cache grows, the cross-attention one is reused
        out = step.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, t:t + 1], **past})
        np.testing.assert_allclose(out[0][:, 0], ref.logits[:, t].numpy(), atol=1e-5, rtol=0)
        past.update(zip(past_names(config.decoder_layers, cross=False), out[1:], strict=True))
    for i, layer in enumerate(ref.past_key_values):  # the final caches are the PyTorch ones
        np.testing.assert_allclose(past[f"past_key_values.{i}.decoder.key"], layer[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(past[f"past_key_values.{i}.encoder.value"], layer[3].numpy(), atol=1e-5, rtol=0)


def test_merged_decoder_runs_both_branches(exported):
    """decoder_model_merged.onnx (optimum's and transformers.js's single decoder): without cache it takes empty
    past tensors and gives the first call's logits and caches; with cache, one step's."""
    config, _, dst, model = exported
    ids, mask, dec = inputs(config)
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(dec), use_cache=True)
    states = ref.encoder_last_hidden_state.numpy()
    merged = ort.InferenceSession(graph(dst, "decoder_model_merged.onnx"))
    empty = np.zeros((len(ids), heads, 0, config.d_model // heads), np.float32)
    common = {"encoder_attention_mask": mask, "encoder_hidden_states": states}
    out = merged.run(None, {**common, "input_ids": dec[:, :5], **dict.fromkeys(past_names(layers), empty),
                            "use_cache_branch": np.array([False])})
    np.testing.assert_allclose(out[0], ref.logits[:, :5].numpy(), atol=1e-5, rtol=0)
    past = dict(zip(past_names(layers), out[1:], strict=True))
    out = merged.run(None, {**common, "input_ids": dec[:, 5:6], **past, "use_cache_branch": np.array([True])})
    np.testing.assert_allclose(out[0][:, 0], ref.logits[:, 5].numpy(), atol=1e-5, rtol=0)
    present = dict(zip(past_names(layers, "present"), out[1:], strict=True))
    for i, layer in enumerate(ref.past_key_values):
        np.testing.assert_allclose(present[f"present.{i}.decoder.value"], layer[1].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(present[f"present.{i}.encoder.key"], past[f"past_key_values.{i}.encoder.key"])


@pytest.mark.skipif(not OPTIMUM, reason="set BLENDERBOT_MB_OPTIMUM_PATH to a folder with optimum-onnx (nox)")
@pytest.mark.parametrize("use_merged", [False, True])
def test_optimum_loads_the_export(tmp_path_factory, use_merged):
    # optimum's dummy past for the merged decoder takes the encoder's head count: a config with equal counts
    config, _, dst, model = export(tmp_path_factory, "tiny")
    ids, mask, _ = inputs(config)
    code = (
        "import sys, json, torch\n"
        "from optimum.onnxruntime import ORTModelForSeq2SeqLM\n"
        "m = ORTModelForSeq2SeqLM.from_pretrained(sys.argv[1], use_merged=sys.argv[3] == 'True')\n"
        "ids, mask = (torch.tensor(x) for x in json.loads(sys.argv[2]))\n"
        "out = m.generate(input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False, max_length=12,\n"
        "                 min_length=0, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=0)\n"
        "print(json.dumps(out.tolist()))\n"
    )
    import json

    env = {**os.environ, "PYTHONPATH": OPTIMUM, "USE_TF": "0", "USE_FLAX": "0"}
    run = subprocess.run([sys.executable, "-c", code, dst, json.dumps([ids.tolist(), mask.tolist()]), str(use_merged)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = np.array(json.loads(run.stdout.strip().splitlines()[-1]))
    ours = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), num_beams=1,
                          max_length=12, min_length=0, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=0,
                          forced_eos_token_id=config.eos_token_id)
    ours = ours.numpy()
    assert len(set(ours[0].tolist())) > 4  # a reply, not one token repeated
    for a, b in zip(theirs, ours, strict=True):  # transformers pads finished rows with eos or pad: compare up to eos
        n = next((i for i in range(1, len(b)) if b[i] == config.eos_token_id), len(b) - 1) + 1
        np.testing.assert_array_equal(a[:n], b[:n])


def test_large_graphs_keep_weights_beside_them(exported, tmp_path, monkeypatch):
    """Graphs above protobuf's 2 GB (the 1B and 3B shapes) store their weights in one `<graph>_data` file;
    a lowered limit takes that path on a tiny model, with the same results."""
    import blenderbot_mb.export.onnx as onnx_export

    config, src, dst, _ = exported
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
    export_model(src, tmp_path / "big", to="onnx")
    ids, mask, dec = inputs(config)
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx",
                 "decoder_model_merged.onnx"):
        assert (tmp_path / "big" / "onnx" / f"{name}_data").is_file()
    assert len([f for f in os.listdir(tmp_path / "big" / "onnx") if f.endswith(".onnx_data")]) == 4
    def logits(folder):
        states = ort.InferenceSession(graph(folder, "encoder_model.onnx")).run(
            None, {"input_ids": ids, "attention_mask": mask})[0]
        return ort.InferenceSession(graph(folder, "decoder_model.onnx")).run(
            ["logits"], {"encoder_attention_mask": mask, "input_ids": dec, "encoder_hidden_states": states})[0]

    np.testing.assert_array_equal(logits(tmp_path / "big"), logits(dst))


def test_export_leaves_the_model_in_eval_mode(exported, tmp_path):
    """export_onnx puts the model in eval mode and keeps it there: a model left training (dropout on) would
    give other logits than the graphs just written."""
    model = exported[3]
    model.train()
    export_onnx(model, tmp_path)
    assert not model.training and not any(m.training for m in model.modules())


def test_weights_torch_writes_one_file_each_are_gathered_into_one(exported, tmp_path):
    """Above 2 GB torch writes every weight into a file of its own; the export streams them into one
    page-aligned `<graph>_data` file (as a graph saved that way here), with the same logits."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    import blenderbot_mb.export.onnx as onnx_export

    config, _, dst, _ = exported
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()
    name = "decoder_model.onnx"
    onnx.save_model(onnx.load(graph(dst, name)), raw / name, save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=64)
    assert len(os.listdir(raw)) > 10
    assert onnx_export._gather(str(raw), name, str(out), size=2**40) == [name, f"{name}_data"]
    assert sorted(os.listdir(out)) == [name, f"{name}_data"]
    external = [t for t in onnx.load(out / name, load_external_data=False).graph.initializer if uses_external_data(t)]
    assert external and all(ExternalDataInfo(t).offset % 4096 == 0 for t in external)
    ids, mask, dec = inputs(config)
    states = ort.InferenceSession(graph(dst, "encoder_model.onnx")).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    feed = {"encoder_attention_mask": mask, "input_ids": dec, "encoder_hidden_states": states}
    np.testing.assert_array_equal(ort.InferenceSession(str(out / name)).run(["logits"], feed)[0],
                                  ort.InferenceSession(graph(dst, name)).run(["logits"], feed)[0])
