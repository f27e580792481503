"""The ParlAI converter against a real ParlAI TransformerGeneratorModel: the converted model's logits equal
ParlAI's own (except the start-token column, which ParlAI's output layer sets to -inf so it is never
generated), and the generation settings come from its options.

ParlAI pins old numpy/torch/protobuf and cannot share an environment with this package's: it runs only
where BLENDERBOT_MB_PARLAI_PATH names a folder with ParlAI installed without its dependencies
(`nox -s oracle_parlai` builds one); the model is built in a subprocess with that folder on its path."""

import os
import subprocess
import sys

import pytest

PARLAI = os.environ.get("BLENDERBOT_MB_PARLAI_PATH")
pytestmark = pytest.mark.skipif(not PARLAI, reason="set BLENDERBOT_MB_PARLAI_PATH to a folder with ParlAI")
SCRIPT = os.path.join(os.path.dirname(__file__), "oracle_parlai", "write_parlai_model.py")


def test_parlai_generator_converts_with_its_logits(tmp_path):
    torch = pytest.importorskip("torch")
    from blenderbot_mb.convert import convert_checkpoint
    from blenderbot_mb.generation_config import GenerationConfig
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    env = {**os.environ, "PYTHONPATH": PARLAI}
    subprocess.run([sys.executable, SCRIPT, str(tmp_path)], check=True, timeout=600, env=env)
    convert_checkpoint(tmp_path / "model.pt", tmp_path / "hf", allow_pickle=True)
    model = BlenderbotForConditionalGeneration.from_pretrained(tmp_path / "hf")
    ref = torch.load(tmp_path / "logits.pt")
    xs, ys = ref["xs"], ref["ys"]
    decoder_input_ids = torch.cat([torch.full_like(ys[:, :1], 1), ys[:, :-1]], 1)  # ParlAI's decode_forced
    with torch.no_grad():
        logits = model(input_ids=xs, attention_mask=(xs != 0).long(), decoder_input_ids=decoder_input_ids).logits
    keep = [i for i in range(logits.shape[-1]) if i != 1]
    torch.testing.assert_close(logits[..., keep], ref["logits"][..., keep], atol=1e-5, rtol=0)
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.num_beams, gen.no_repeat_ngram_size, gen.encoder_no_repeat_ngram_size) == (2, 3, 3)
    assert gen.length_penalty == 0.65 and gen.max_length == 20
