"""`train` means the same on every backend: one tiny run with every option that changes the arithmetic
(cosine schedule with warmup, clipping, weight decay, label smoothing, accumulation) on PyTorch, TensorFlow and
Flax gives the losses, gradient norms, weights and evaluation loss of a loop written here with transformers'
PyTorch model and torch's AdamW; each backend's model folder loads in transformers."""

import importlib
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import training_files  # noqa: E402

from blenderbot_mb.data import encode_examples  # noqa: E402
from blenderbot_mb.trainer import prepare_run  # noqa: E402

OPTIONS = dict(batch_size=2, grad_accum=2, max_steps=3, lr=1e-2, warmup=1, schedule="cosine", weight_decay=0.1,
               max_grad_norm=0.5, label_smoothing=0.1, seed=4)


def oracle(base: str, data: str, out: str) -> tuple[dict, list, list, float]:
    """(state dict, losses, gradient norms, evaluation loss) of OPTIONS' updates on the run's global batches,
    with transformers' model, torch's cross-entropy (ignore_index -100, label smoothing; none in evaluation)
    and torch.optim.AdamW."""
    run = prepare_run(data=data, out=out, model=base, **OPTIONS)
    model = transformers.BlenderbotForConditionalGeneration.from_pretrained(base).train()
    params = dict(model.named_parameters())  # the tied embedding once; final_logits_bias is a buffer
    decay = [p for n, p in params.items() if n.endswith(".weight") and "layer_norm" not in n]
    rest = [p for n, p in params.items() if not (n.endswith(".weight") and "layer_norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIONS["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], betas=(0.9, 0.999), eps=1e-8)
    losses, norms = [], []
    steps, warmup, lr = OPTIONS["max_steps"], OPTIONS["warmup"], OPTIONS["lr"]
    for step, (_, _, indices) in zip(range(steps), run.schedule(0, 0, 1), strict=False):
        micro = run.micro_batches(run.data, indices, OPTIONS["grad_accum"], 1, 0)
        count = sum(int((m["labels"] != -100).sum()) for m in micro)  # the global token count
        total = 0.0
        for m in micro:
            labels = torch.tensor(m["labels"])
            logits = model(input_ids=torch.tensor(m["input_ids"]), attention_mask=torch.tensor(m["attention_mask"]),
                           labels=labels).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                     label_smoothing=OPTIONS["label_smoothing"], reduction="sum")
            (loss / count).backward()
            total += float(loss) / count
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values())))
        if norm > OPTIONS["max_grad_norm"]:
            for p in params.values():
                p.grad *= OPTIONS["max_grad_norm"] / norm
        progress = (step - warmup) / (steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * step / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
        norms.append(norm)
    model.eval()
    examples = [run.data[i] for i in range(len(run.data))]
    with torch.no_grad():  # evaluation: every example, without dropout or smoothing
        batch = {k: torch.tensor(v) for k, v in encode_examples(run.tokenizer, examples, run.max_length).items()}
        logits = model(**batch).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, losses, norms, float(nll)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tokenizer_folder):
    folder = str(tmp_path_factory.mktemp("train-backends"))
    base, data = training_files(folder, tokenizer_folder)  # no dropout: every layout draws the same nothing
    return base, data, oracle(base, data, os.path.join(folder, "unused"))


@pytest.mark.parametrize("backend", ["torch", "tf", "flax"])
def test_a_run_makes_the_oracles_updates(tmp_path, expected, backend):
    train = importlib.import_module(f"blenderbot_mb.{backend}.training").train
    base, data, (weights, losses, norms, eval_loss) = expected
    start = transformers.BlenderbotForConditionalGeneration.from_pretrained(base).state_dict()
    assert max(float((torch.tensor(weights[k]) - v).abs().max()) for k, v in start.items()) > 1e-2  # it moved
    assert max(norms) > OPTIONS["max_grad_norm"]  # the clip acts
    result = train(data=data, eval_data=data, out=str(tmp_path / "run"), model=base, progress=False, **OPTIONS)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert result.eval_loss == pytest.approx(eval_loss, rel=1e-5) and logged.pop()["eval_loss"] == result.eval_loss
    np.testing.assert_allclose([x["loss"] for x in logged], losses, rtol=1e-5)
    np.testing.assert_allclose([x["grad_norm"] for x in logged], norms, rtol=1e-5)
    got = transformers.BlenderbotForConditionalGeneration.from_pretrained(result.model).state_dict()
    for name, value in weights.items():
        if not name.endswith("k_proj.bias"):  # softmax ignores them: AdamW turns rounding noise into steps
            np.testing.assert_allclose(got[name].numpy(), value, atol=1e-5, rtol=0, err_msg=name)


def test_lora_runs_agree_across_backends(tmp_path, expected):
    """LoRA (attention and FFN) from the same start in every backend (`lora.initial_a`): the three backends log
    the same losses and write the same adapters; every adapter's A moved from its start, B from zero."""
    from blenderbot_mb import lora

    base, data, _ = expected
    options = {**OPTIONS, "lr": 1e-2, "lora_rank": 2, "lora_ffn": True}
    losses, adapters = {}, {}
    for backend in ("torch", "tf", "flax"):
        train = importlib.import_module(f"blenderbot_mb.{backend}.training").train
        out = tmp_path / backend
        train(data=data, out=str(out), model=base, progress=False, **options)
        losses[backend] = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
        adapters[backend] = lora.read_adapters(str(out / "adapter"))[0]
    for backend in ("tf", "flax"):
        np.testing.assert_allclose(losses[backend], losses["torch"], rtol=1e-5, err_msg=backend)
        assert set(adapters[backend]) == set(adapters["torch"])
        for module, (a, b) in adapters["torch"].items():
            np.testing.assert_allclose(adapters[backend][module][0], a, atol=1e-5, err_msg=f"{backend} {module} A")
            np.testing.assert_allclose(adapters[backend][module][1], b, atol=1e-5, err_msg=f"{backend} {module} B")
    module, (a, b) = next(iter(adapters["torch"].items()))
    assert np.abs(b).max() > 0 and not np.allclose(a, lora.initial_a(module, a.shape[1], 2, OPTIONS["seed"]))
