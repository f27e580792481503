"""The ONNX export loads in transformers.js (node, local files, default options): its tokenizer gives our
tokenizer's ids and text, its logits are the PyTorch backend's within 1e-4 and its greedy replies (with
n-gram blocking, min length and forced eos from generation_config.json) are the PyTorch backend's, also
where the graphs keep their weights in `_data` files beside them.

Needs node and the npm package @huggingface/transformers in BLENDERBOT_MB_TRANSFORMERS_JS (a folder whose
node_modules holds it; default: .cache/transformers-js in the repository, where the README's test
command installs it when npm is there)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import make_config, random_weights, write_checkpoint

pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

import blenderbot_mb.export.onnx as onnx_export  # noqa: E402
from blenderbot_mb.convert import TOKENIZER_FILES  # noqa: E402
from blenderbot_mb.default_model import default_model_path  # noqa: E402
from blenderbot_mb.export import export_model  # noqa: E402
from blenderbot_mb.tokenizer import BlenderbotTokenizer  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("BLENDERBOT_MB_TRANSFORMERS_JS", ROOT / ".cache" / "transformers-js"))
SCRIPT = Path(__file__).with_name("transformers_js_run.mjs")
TEXTS = ["Hello world", " Hello! How are you today?", "your persona: I like cheese.\n I'm fine.  Nice, and you?"]


@pytest.fixture(scope="module")
def node():
    node = shutil.which("node")
    if node and (HOME / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        return node
    if os.environ.get("CI", "").lower() == "true" and shutil.which("npm"):
        pytest.fail(f"CI has npm: install transformers.js into {HOME} (see the README's test command)")
    pytest.skip(f"needs node and `npm install --prefix {HOME} @huggingface/transformers`")


@pytest.fixture(scope="module", params=["one file", "external data"])
def exported(request, tmp_path_factory):
    """A tiny random model with the packaged default model's tokenizer (vocabulary 8008), exported; with
    `external data`, every graph keeps its weights in a `_data` file, as the 1B and 3B shapes' do."""
    config = make_config("tiny", vocab_size=8008)
    generation = {"num_beams": 1, "max_length": 40, "min_length": 5, "no_repeat_ngram_size": 2,
                  **{k: getattr(config, k) for k in ("decoder_start_token_id", "bos_token_id", "eos_token_id",
                                                     "pad_token_id", "forced_eos_token_id")}}
    src = write_checkpoint(tmp_path_factory.mktemp("src"), config, random_weights(config, seed=11),
                           generation=generation)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(default_model_path(), name)):
            shutil.copy(os.path.join(default_model_path(), name), src)
    dst = str(tmp_path_factory.mktemp("out") / "bb-onnx")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "external data":
            patch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
        export_model(src, dst, to="onnx")
    assert os.path.isfile(os.path.join(dst, "onnx", "encoder_model.onnx_data")) == (request.param == "external data")
    return config, dst, BlenderbotForConditionalGeneration.from_pretrained(src), BlenderbotTokenizer.from_pretrained(src)


def test_transformers_js_matches_pytorch(node, exported):
    config, dst, model, tokenizer = exported
    batch = tokenizer(TEXTS[1:], padding=True)
    ids, mask = np.array(batch["input_ids"]), np.array(batch["attention_mask"])
    dec = np.random.default_rng(0).integers(4, config.vocab_size, (len(ids), 5))
    dec[:, 0] = config.decoder_start_token_id
    request = {"texts": TEXTS, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
               "decoder_input_ids": dec.tolist(), "generate": {"max_new_tokens": 12, "do_sample": False}}
    run = subprocess.run([node, str(SCRIPT), dst, json.dumps(request)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRANSFORMERS_JS_HOME": str(HOME)})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])

    assert theirs["encoded"] == [tokenizer.encode(t) for t in TEXTS]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    logits = np.array(theirs["logits"]["data"], np.float32).reshape(theirs["logits"]["dims"])
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

    ours = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=12, do_sample=False).numpy()
    assert ours.shape[1] == 13 and len(set(ours[0].tolist())) > 5  # a reply of the full length, not one token
    for a, b in zip(theirs["replies"], ours.tolist(), strict=True):  # rows after eos: compare up to it
        n = b.index(config.eos_token_id) + 1 if config.eos_token_id in b else len(b)
        assert a[:n] == b[:n]
    assert theirs["texts"] == tokenizer.batch_decode(ours, skip_special_tokens=True)
