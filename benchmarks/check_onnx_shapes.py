"""Check the ONNX export at the published shapes: random weights, float32, small inputs.

    python benchmarks/check_onnx_shapes.py --shapes blenderbot-400M-distill,blenderbot-1B-distill
    python benchmarks/check_onnx_shapes.py --shapes blenderbot-3B --device cuda       # a large host or GPU

For each shape: export with `convert --to onnx`'s exporter, then compare the graphs' logits (encoder +
decoder on a padded batch, then two steps of the decoder with past) with the PyTorch backend's, and the
greedy and beam replies of ORTBlenderbotForConditionalGeneration (onnxruntime + the core search) with the
PyTorch backend's `generate`. Prints the largest logit difference (tolerance 1e-4) and whether the tokens
agree; exits 1 if any check fails. Memory: about 3x the float32 weights during export (the model, the traced
graph, the written copy); 3B needs more than 24 GB of RAM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from benchmark_generate import make_config

TOLERANCE = 1e-4


def check(shape: str, device: str, new_tokens: int) -> bool:
    import torch

    from blenderbot_mb.export import export_model
    from blenderbot_mb.export.onnx import past_names
    from blenderbot_mb.export.ort import ORTBlenderbotForConditionalGeneration
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    config = make_config(shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = BlenderbotForConditionalGeneration(config).eval()
        model.save_pretrained(os.path.join(folder, "model"))
        start = time.perf_counter()
        export_model(os.path.join(folder, "model"), os.path.join(folder, "onnx"), to="onnx")
        exported = time.perf_counter() - start
        model.to(device)
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        ort = ORTBlenderbotForConditionalGeneration.from_pretrained(os.path.join(folder, "onnx"), providers=providers)
        rng = np.random.default_rng(0)
        ids = rng.integers(4, config.vocab_size, (2, 16))
        ids[:, -1] = config.eos_token_id
        mask = np.ones_like(ids)
        ids[1, 9], ids[1, 10:], mask[1, 10:] = config.eos_token_id, config.pad_token_id, 0
        dec = rng.integers(4, config.vocab_size, (2, 8))
        dec[:, 0] = config.decoder_start_token_id
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                        decoder_input_ids=torch.from_numpy(dec).to(device)).logits.float().cpu().numpy()
        states = ort.encode(ids, mask)
        out = ort.decoder.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, :6],
                                     "encoder_hidden_states": states})
        diff = float(np.abs(out[0] - ref[:, :6]).max())
        past = dict(zip(past_names(config.decoder_layers), out[1:], strict=True))
        for t in (6, 7):
            step = ort.decoder_with_past.run(None, {"encoder_attention_mask": mask, "input_ids": dec[:, t:t + 1],
                                                    **past})
            diff = max(diff, float(np.abs(step[0][:, 0] - ref[:, t]).max()))
            past.update(zip(past_names(config.decoder_layers, cross=False), step[1:], strict=True))
        same = {}
        for beams in (1, 4):
            settings = dict(num_beams=beams, max_length=1 + new_tokens, min_length=0, no_repeat_ngram_size=3,
                            encoder_no_repeat_ngram_size=3)
            with torch.no_grad():
                want = model.generate(input_ids=torch.from_numpy(ids).to(device),
                                      attention_mask=torch.from_numpy(mask).to(device), **settings).cpu().numpy()
            got = ort.generate(ids, mask, **settings)
            same[beams] = got.shape == want.shape and bool((got == want).all())
        ok = diff <= TOLERANCE and all(same.values())
        print(f"| {shape} | {exported:.0f} s | {diff:.2e} | {same[1]} | {same[4]} | {'ok' if ok else 'FAIL'} |",
              flush=True)
        return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="blenderbot-400M-distill,blenderbot-1B-distill,blenderbot-3B")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--new-tokens", type=int, default=12)
    args = p.parse_args(argv)
    print("| shape | export | max logit diff | greedy tokens equal | beam 4 tokens equal | |")
    print("|---|---|---|---|---|---|")
    results = [check(shape, args.device, args.new_tokens) for shape in args.shapes.split(",")]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
