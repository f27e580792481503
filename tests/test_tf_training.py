"""TF training: Keras fit with the model's own loss, one SGD step equal to PyTorch's, fit lowers the loss,
evaluate/predict, mixed precision, checkpoints during training."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from helpers import hf_model, make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb.tf import CheckpointCallback, TFBlenderbotForConditionalGeneration  # noqa: E402


def model_and_data(name="odd", seed=0, **overrides):
    config = make_config(name, **overrides)
    weights = random_weights(config, seed=seed)
    model = TFBlenderbotForConditionalGeneration(config)
    model.load_weights_dict(weights)
    batch = random_batch(config, batch=4)
    data = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "labels")}
    return config, weights, model, data


def test_one_sgd_step_equals_pytorch():
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


def test_fit_lowers_the_loss_on_a_dataset_and_labels_as_y(tmp_path):
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
    out = model.predict(data, batch_size=3, verbose=0)
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
