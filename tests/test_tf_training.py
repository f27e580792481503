"""TF training: Keras fit with the model's own loss, one SGD step equal to PyTorch's, fit lowers the loss,
evaluate/predict, mixed precision, checkpoints during training."""

import json
import os
import sys
import tempfile
from functools import partial

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from helpers import KERNELS_LANE, hf_model, make_config, random_batch, random_weights, start_check  # noqa: E402

from blenderbot_mb.tf import CheckpointCallback, TFBlenderbotForConditionalGeneration  # noqa: E402


def model_and_data(name="odd", seed=0, **overrides):
    config = make_config(name, **overrides)
    weights = random_weights(config, seed=seed)
    model = TFBlenderbotForConditionalGeneration(config)
    model.load_weights_dict(weights)
    batch = random_batch(config, batch=4)
    data = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "labels")}
    return config, weights, model, data


@pytest.fixture
def graph_optimizer_on():
    """TensorFlow's graph optimizer on, as users run (the suite turns it off: helpers.TF_GRAPH_OPTIMIZER_OFF)."""
    before = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before.get("disable_meta_optimizer",
                                                                                        False)})


def test_one_sgd_step_equals_pytorch(graph_optimizer_on):
    torch = pytest.importorskip("torch")
    config, weights, model, data = model_and_data("odd")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), jit_compile=False)  # no loss: the model's
    model.fit(data, batch_size=4, epochs=1, shuffle=False, verbose=0)
    hf = hf_model(config, weights).train()
    optimizer = torch.optim.SGD(hf.parameters(), lr=0.5)
    hf(**{k: torch.tensor(v.astype(np.int64)) for k, v in data.items()}).loss.backward()
    optimizer.step()
    expected = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = model.state_dict()
    moved = 0.0
    for name, value in ours.items():
        np.testing.assert_allclose(value, expected[name], atol=1e-5, rtol=0, err_msg=name)
        moved = max(moved, float(np.abs(value - weights[name]).max()))
    assert moved > 1e-2  # the step did change the weights
    np.testing.assert_array_equal(ours["final_logits_bias"], weights["final_logits_bias"])  # frozen, as in PyTorch


def test_fit_lowers_the_loss_on_a_dataset_and_labels_as_y():
    """(fit_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_tf_training:fit_check")


test_fit_lowers_the_loss_on_a_dataset_and_labels_as_y.early = partial(start_check, "test_tf_training:fit_check")


def fit_check(tmp_path, tokenizer_folder):
    config, _, model, data = model_and_data("tiny", seed=1)
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(2)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-3), jit_compile=False)
    before = model.evaluate(dataset, verbose=0)
    callback = CheckpointCallback(tmp_path, every_n_epochs=2, keep_last=1)
    history = model.fit(dataset, epochs=4, verbose=0, callbacks=[callback])
    losses = history.history["loss"]
    assert losses[-1] < losses[0] and model.evaluate(dataset, verbose=0) < before
    # the callback saved HF-layout checkpoints (only the last one kept); it reloads with the trained weights
    assert [p.split("-")[-1] for p in callback.saved] == ["4"]
    again = TFBlenderbotForConditionalGeneration.from_pretrained(callback.saved[-1])
    np.testing.assert_array_equal(again.state_dict()["model.shared.weight"], model.state_dict()["model.shared.weight"])
    # labels may also come as Keras' y
    x = {k: v for k, v in data.items() if k != "labels"}
    model.fit(x, data["labels"], batch_size=2, epochs=1, verbose=0)
    out = model.predict(data, batch_size=2, verbose=0)
    assert out["logits"].shape == (4, data["labels"].shape[1], config.vocab_size)


def test_loss_ignores_only_minus_100():
    config, _, model, data = model_and_data("tiny", seed=2)
    labels = data["labels"].copy()
    labels[0, 1] = config.pad_token_id  # a pad label counts: only -100 is ignored (blenderbot_mb.training)
    out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=labels)
    logits = out.logits.numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != -100
    expected = -np.mean(np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep])
    np.testing.assert_allclose(float(out.loss), expected, atol=1e-5)


def _numpy_loss_and_accuracy(logits, labels):
    """Token cross-entropy (mean over labels that are not -100) and accuracy, in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != -100
    picked = np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return -picked[keep].mean(), (logits.argmax(-1) == labels)[keep].mean()


def test_keras_losses_and_metrics_read_the_logits():
    """compile(loss=..., metrics=...) as with the reference's models: y is matched to the logits (the labels
    as y or as x["labels"]; the decoder input shifted from them when x has none), so Keras' losses and
    metrics give numpy's cross-entropy and accuracy of the model's own logits."""
    def favouring_7():  # a model that favours token 7, so that the accuracy is not 0
        config, _, model, data = model_and_data("tiny", seed=4)
        model.final_logits_bias.assign(np.eye(1, config.vocab_size, 7, dtype=np.float32) * 4)
        return model, data

    model, data = favouring_7()
    labels = data["labels"].copy()
    labels[:, :3] = 7
    x = {k: data[k] for k in ("input_ids", "attention_mask")}
    logits = model(**x, labels=labels).logits.numpy()
    expected_loss, expected_accuracy = _numpy_loss_and_accuracy(logits, labels)
    assert 0 < expected_accuracy < 1
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss, jit_compile=False,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    for args in ((x, labels), ({**x, "labels": labels},)):
        got = model.evaluate(*args, batch_size=4, verbose=0, return_dict=True)
        np.testing.assert_allclose(got["loss"], expected_loss, rtol=1e-5)
        # Keras' accuracy counts the -100 positions as misses: numpy's over every position, -100 never matching
        np.testing.assert_allclose(got["acc"], (logits.argmax(-1) == labels).mean(), rtol=1e-6)
    # sample weights: Keras' own rule on the logits (here one row weighted out)
    weights = np.ones(labels.shape, np.float32)
    weights[1] = 0.0
    got = model.evaluate(x, labels, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], float(loss(labels, logits, sample_weight=weights)), rtol=1e-5)
    # the model's own loss takes metrics too; sample weights are refused there (the loss is a mean over tokens).
    # A fresh model: Keras keeps a compiled loss through a later compile() without one
    model, _ = favouring_7()
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"], jit_compile=False)
    got = model.evaluate(x, labels, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], (logits.argmax(-1) == labels).mean(), rtol=1e-6)
    from blenderbot_mb.errors import InputError

    with pytest.raises(InputError, match="sample_weight .* needs a Keras loss"):
        model.evaluate(x, labels, sample_weight=weights, batch_size=4, verbose=0)


def test_keras_model_save_and_load_model(tmp_path):
    """model.save("x.keras") (and ModelCheckpoint's full saves) store the config, generation settings and
    weights; keras.models.load_model gives the same logits and generate() settings."""
    config, _, model, data = model_and_data("tiny", seed=5)
    model.generation_config.num_beams = 3
    model.compile(optimizer=keras.optimizers.SGD(1e-2), jit_compile=False)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch.keras"))
    model.fit(data, batch_size=2, epochs=1, verbose=0, callbacks=[checkpoint])
    model.save(tmp_path / "x.keras")
    for path in (tmp_path / "x.keras", tmp_path / "epoch.keras"):
        loaded = keras.models.load_model(path)
        assert type(loaded) is TFBlenderbotForConditionalGeneration
        x = {k: data[k] for k in ("input_ids", "attention_mask", "labels")}
        np.testing.assert_array_equal(loaded(**x).logits.numpy(), model(**x).logits.numpy())
        assert loaded.config.to_dict() == config.to_dict() and loaded.generation_config.num_beams == 3


def test_mixed_precision_fit():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config, weights, model, data = model_and_data("tiny", seed=3)
        assert model.model.encoder.layers[0].fc1.compute_dtype == "float16"
        assert model.model.encoder.layers[0].fc1.kernel.dtype == "float32"
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), jit_compile=False)
        history = model.fit(data, batch_size=2, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        out = model(input_ids=data["input_ids"], labels=data["labels"])
        assert out.logits.dtype == tf.float16 and out.loss.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------- the engine of `blenderbot-mb train --backend tf`
HERE = os.path.dirname(os.path.abspath(__file__))


_MIRRORED_FOLDER = tempfile.TemporaryDirectory(prefix="tf-mirrored-")  # removed when the run ends
_MIRRORED_OUT = os.path.join(_MIRRORED_FOLDER.name, "out.npz")


def start_mirrored_check() -> None:
    """tf_distributed_check.py (~2 minutes) in its process, started early (helpers.start_early)."""
    from helpers import CHECKS_LANE, start_early

    start_early("tf mirrored", [sys.executable, os.path.join(HERE, "tf_distributed_check.py"), _MIRRORED_OUT],
                env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), lane=CHECKS_LANE)


def test_mirrored_strategy_on_two_devices_makes_the_update_of_one():
    """MirroredStrategy over 2 logical CPUs: one SGD step (2 accumulated micro-batches) equals transformers'
    PyTorch SGD step on the whole batch, a clipped one its step after clip_grad_norm_; the model in Keras' own
    fit on 2 replicas makes transformers' step and reports its loss (AdamW on 2 workers: two_workers_check)."""
    from helpers import early_result

    torch = pytest.importorskip("torch")
    start_mirrored_check()
    code, out, err = early_result("tf mirrored", timeout=600)
    assert code == 0, out[-2000:] + err[-3000:]
    got = np.load(_MIRRORED_OUT)
    config = make_config("tiny")
    weights = random_weights(config, seed=0)
    batch = random_batch(config, batch=4, src_len=9, tgt_len=7, seed=1)
    hf = hf_model(config, weights).train()
    optimizer = torch.optim.SGD(hf.parameters(), lr=0.5)
    hf(**{k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    optimizer.step()
    expected = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert max(np.abs(expected[k] - weights[k]).max() for k in weights) > 1e-2
    hf = hf_model(config, weights).train()  # the clipped step: the whole batch's gradient to norm 0.5 at most
    optimizer = torch.optim.SGD(hf.parameters(), lr=0.5)
    hf(**{k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
    optimizer.step()
    clipped = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for name in weights:
        np.testing.assert_allclose(got[f"accum/{name}"], expected[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(got[f"clip2/{name}"], clipped[name], atol=1e-5, rtol=0, err_msg=name)
    moved = max(np.abs(clipped[k] - weights[k]).max() for k in weights)
    assert moved < max(np.abs(expected[k] - weights[k]).max() for k in weights) / 2  # the clip did act
    # the model in Keras' own fit, its own loss or a compiled Keras loss, on 1 or 2 replicas: transformers' step
    # and loss (rows without -100 labels: each replica's mean over its tokens is then the batch's)
    even = random_batch(config, batch=4, src_len=9, tgt_len=7, seed=1, pad=False)
    hf = hf_model(config, weights).train()
    optimizer = torch.optim.SGD(hf.parameters(), lr=0.5)
    loss = hf(**{k: torch.tensor(even[k]) for k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    optimizer.step()
    expected = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for run in ("keras2", "keras2-compiled"):
        np.testing.assert_allclose(got[f"{run}/loss"], [loss.item()], rtol=1e-5, err_msg=run)
        for name in weights:
            np.testing.assert_allclose(got[f"{run}/{name}"], expected[name], atol=1e-5, rtol=0, err_msg=f"{run} {name}")


test_mirrored_strategy_on_two_devices_makes_the_update_of_one.early = start_mirrored_check


def killed_run_check(folder, tokenizer_folder):
    from helpers import check_killed_run_resumes

    check_killed_run_resumes("tf", folder, tokenizer_folder)


def test_killed_run_resumes_to_the_same_weights():
    """(killed_run_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_tf_training:killed_run_check")


test_killed_run_resumes_to_the_same_weights.early = partial(start_check, "test_tf_training:killed_run_check")


def test_gradient_checkpointing_gives_the_same_gradients():
    from blenderbot_mb.tf.training import Trainer, enable_gradient_checkpointing

    config, weights, model, data = model_and_data("odd")  # 1 encoder layer, 3 decoder layers
    plain = Trainer(model)
    stacked = {k: tf.constant(v) for k, v in data.items()}

    def grads(trainer):
        with tf.GradientTape() as tape:
            loss = trainer._loss_sum(stacked, training=True)
        return tape.gradient(loss, trainer.trainable_variables)

    expected = grads(plain)
    other = TFBlenderbotForConditionalGeneration(config)
    other.load_weights_dict(weights)
    enable_gradient_checkpointing(other)
    remat = Trainer(other)
    got = grads(remat)
    assert len(got) == len(expected) and all(g is not None for g in got)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), atol=1e-5)
    out = other(input_ids=data["input_ids"], labels=data["labels"])  # inference keeps every output
    assert out.logits.shape[-1] == config.vocab_size


def test_lora_adapters_in_peft_layout_merge_as_the_core_rule(tmp_path):
    from blenderbot_mb import lora
    from blenderbot_mb.tf.training import adapter_tensors, add_lora, load_adapters

    config, weights, model, data = model_and_data("tiny")
    layers = add_lora(model, rank=4, alpha=8, ffn=True, seed=0)
    assert sorted(layers) == sorted(lora.target_modules(config, lora.target_names(True)))
    assert {v.path.split("/")[-1] for v in model.trainable_variables} == {"lora_kernel_a", "lora_kernel_b"}
    for layer in layers.values():  # as if trained: B non-zero
        layer.lora_kernel_b.assign(np.random.default_rng(0).normal(0, 0.1, layer.lora_kernel_b.shape))
    tensors = adapter_tensors(layers)
    key_a, key_b = lora.adapter_keys("model.decoder.layers.1.encoder_attn.k_proj")
    assert tensors[key_a].shape == (4, 16) and tensors[key_b].shape == (16, 4)
    lora.save_adapters(str(tmp_path), tensors, rank=4, alpha=8, targets=lora.target_names(True))
    modules, adapter_config = lora.read_adapters(str(tmp_path))
    merged = lora.merge(weights, modules, adapter_config["lora_alpha"] / adapter_config["r"])
    ours = model.state_dict()  # Keras' LoRA layers report the merged kernels
    for name, value in merged.items():
        np.testing.assert_allclose(ours[name], value, atol=1e-6, err_msg=name)
    assert np.abs(ours["model.encoder.layers.0.fc1.weight"] - weights["model.encoder.layers.0.fc1.weight"]).max() > 0
    plain = TFBlenderbotForConditionalGeneration(config)
    plain.load_weights_dict(merged)
    np.testing.assert_allclose(plain(data).logits.numpy(), model(data).logits.numpy(), atol=1e-5)
    other = TFBlenderbotForConditionalGeneration(config)
    other.load_weights_dict(weights)
    load_adapters(add_lora(other, rank=4, alpha=8, ffn=True), modules)
    np.testing.assert_allclose(other(data).logits.numpy(), model(data).logits.numpy(), atol=1e-6)


def lora_run_check(folder, tokenizer_folder):
    from helpers import check_lora_run

    from blenderbot_mb.tf.training import train

    check_lora_run(train, folder, tokenizer_folder, "tf")


def test_lora_run_writes_peft_adapters_merges_and_resumes():
    """(lora_run_check, in a process of its own started early in the kernels' lane: helpers.run_check)"""
    from helpers import run_check

    start_check("test_tf_training:lora_run_check", lane=KERNELS_LANE)
    run_check("test_tf_training:lora_run_check")


test_lora_run_writes_peft_adapters_merges_and_resumes.early = partial(
    start_check, "test_tf_training:lora_run_check", lane=KERNELS_LANE)


def test_worker_rank_puts_the_chief_first(monkeypatch):
    from blenderbot_mb.errors import ConfigError
    from blenderbot_mb.tf.training import worker_rank

    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"], "evaluator": ["h3:1"]}
    expected = [("chief", 0, (0, 3)), ("worker", 0, (1, 3)), ("worker", 1, (2, 3))]
    for task, index, rank in expected:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": task, "index": index}}))
        assert worker_rank(tf.distribute.cluster_resolver.TFConfigClusterResolver()) == rank
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["h0:1", "h1:1"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert worker_rank(tf.distribute.cluster_resolver.TFConfigClusterResolver()) == (1, 2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}}))
    with pytest.raises(ConfigError, match="evaluator"):
        worker_rank(tf.distribute.cluster_resolver.TFConfigClusterResolver())
    monkeypatch.delenv("TF_CONFIG")
    assert worker_rank(None) == (0, 1)


# signs in a worker's log that this TensorFlow build or host cannot run multi-worker collectives at all
NO_COLLECTIVES = ("Could not start gRPC server", "Failed to start server", "UNIMPLEMENTED: ",
                  "is not compiled with", "Address already in use")


def two_workers_check(folder, tokenizer_folder):
    """`blenderbot-mb train --backend tf` on 2 localhost workers: MultiWorkerMirroredStrategy from TF_CONFIG, CPU
    only, the chief (worker 0) writing (helpers.check_two_process_cli_run)."""
    from helpers import check_two_process_cli_run, free_ports

    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    envs = [dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                 TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})) for i in range(2)]
    check_two_process_cli_run("tf", folder, tokenizer_folder, envs, unavailable=NO_COLLECTIVES)


def two_workers_resume_check(folder, tokenizer_folder):
    """2 localhost workers (MultiWorkerMirroredStrategy from TF_CONFIG) sharing one --out, killed after update 3
    and resumed with --resume on 2 workers: the uninterrupted 2-worker run's losses and fp32 weights (the dropout
    of each worker and update, the data position, AdamW's state; helpers.check_two_process_killed_run_resumes)."""
    from helpers import check_two_process_killed_run_resumes

    check_two_process_killed_run_resumes("tf", folder, tokenizer_folder, two_worker_envs, unavailable=NO_COLLECTIVES)


def two_worker_envs() -> list[dict]:
    """The environments of 2 CPU workers on localhost (TF_CONFIG), on new ports at every call."""
    from helpers import free_ports

    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    return [dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                 TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})) for i in range(2)]


def test_two_workers_make_the_same_updates_as_one_process_and_only_the_chief_writes():
    """(two_workers_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_tf_training:two_workers_check")


def test_two_workers_killed_and_resumed_end_with_the_weights_of_an_uninterrupted_run():
    """(two_workers_resume_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_tf_training:two_workers_resume_check")


test_two_workers_make_the_same_updates_as_one_process_and_only_the_chief_writes.early = partial(
    start_check, "test_tf_training:two_workers_check")
test_two_workers_killed_and_resumed_end_with_the_weights_of_an_uninterrupted_run.early = partial(
    start_check, "test_tf_training:two_workers_resume_check")


def test_bf16_run_computes_in_bf16_and_keeps_float32_weights(tmp_path, tokenizer_folder):
    from helpers import training_files
    from safetensors.numpy import load_file

    from blenderbot_mb.tf.training import TFEngine, train
    from blenderbot_mb.trainer import prepare_run

    base, data = training_files(str(tmp_path), tokenizer_folder)
    common = dict(data=data, model=base, max_steps=3, batch_size=4, lr=1e-2, progress=False)
    engine = TFEngine(prepare_run(out=str(tmp_path / "unused"), precision="bf16", **common))
    layer = engine.model.model.encoder.layers[0].fc1
    assert layer.compute_dtype == "bfloat16" and layer.kernel.dtype == "float32"
    runs = {p: train(out=str(tmp_path / p), precision=p, **common) for p in ("fp32", "bf16")}
    losses = {p: [json.loads(x)["loss"] for x in open(tmp_path / p / "metrics.jsonl")] for p in runs}
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=2e-2)  # bf16 keeps ~3 significant digits
    assert losses["bf16"] != losses["fp32"] and losses["bf16"][-1] < losses["bf16"][0]
    weights = load_file(os.path.join(runs["bf16"].model, "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {np.dtype(np.float32)}
    start = load_file(os.path.join(base, "model.safetensors"))
    assert max(np.abs(weights[k] - start[k]).max() for k in start) > 1e-3


def test_fit_evaluate_predict_without_labels_say_so_and_a_corrected_fit_runs():
    from blenderbot_mb.errors import InputError

    config, _, model, data = model_and_data("tiny", seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x = {k: data[k] for k in ("input_ids", "attention_mask")}
    for call in (model.fit, model.evaluate):
        with pytest.raises(InputError, match=r"need the replies' labels: give them in x\['labels'\] or as y"):
            call(x, batch_size=2, verbose=0)
    with pytest.raises(InputError, match=r"predict\(\) scores given replies: give x\['decoder_input_ids'\]"):
        model.predict(x, batch_size=2, verbose=0)
    assert np.isfinite(model.fit(data, batch_size=2, verbose=0).history["loss"][0])  # (the failed fit built nothing)


def two_workers_refusals_check(folder, tokenizer_folder):
    """2 localhost workers (TF_CONFIG) given different options both stop with one error naming them; SIGTERM to
    both mid-run stops both, exit code 130 (helpers.check_two_process_refusals_and_sigterm)."""
    from helpers import check_two_process_refusals_and_sigterm

    check_two_process_refusals_and_sigterm("tf", folder, tokenizer_folder, two_worker_envs, unavailable=NO_COLLECTIVES)


def test_two_workers_refuse_different_options_and_stop_on_sigterm():
    """(two_workers_refusals_check, in a process of its own started early: helpers.run_check)"""
    from helpers import run_check

    run_check("test_tf_training:two_workers_refusals_check")


test_two_workers_refuse_different_options_and_stop_on_sigterm.early = partial(
    start_check, "test_tf_training:two_workers_refusals_check", lane=KERNELS_LANE)


def test_a_graph_error_is_one_line_of_what_went_wrong():
    """The command's `error:` line for a TensorFlow graph error keeps TF's own message, not the Python frames
    where the op was defined nor the node and function marks (Keras' fit, a plain tf.function)."""
    from blenderbot_mb.cli import error_line

    class Gather(keras.layers.Layer):
        def call(self, x):
            return tf.gather(x, tf.constant([5]), axis=1)

    model = keras.Sequential([keras.Input((3,)), Gather()])
    model.compile(loss="mse")
    expected = "InvalidArgumentError: indices[0] = 5 is not in [0, 3)"  # 5 outside a row of 3
    with pytest.raises(tf.errors.InvalidArgumentError) as fit_error:
        model.fit(np.zeros((2, 3)), np.zeros((2, 1)), verbose=0)
    assert "File " in str(fit_error.value) and error_line(fit_error.value) == expected
    with pytest.raises(tf.errors.InvalidArgumentError) as function_error:
        tf.function(lambda x: tf.gather(x, [5]))(tf.zeros(3))
    assert error_line(function_error.value) == expected
