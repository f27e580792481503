"""TF training over 2 logical CPU devices (MirroredStrategy), for tests/test_tf_training.py; run as a script:

    python tests/tf_distributed_check.py OUT.npz

On a tiny random model and one global batch of 4 rows, `training.Trainer` under `model.fit` makes: one SGD step
on 2 replicas with 2 accumulated micro-batches; one clipped SGD step on 2 replicas; and the model in Keras' own
`fit` (its own loss, or a compiled Keras loss) on 2 replicas. (Each is checked against transformers' step by the
test; one device is the single-process tests' case, AdamW on 2 workers the `train` command's 2-worker check.)
The params after the SGD steps and the losses of Keras' fit go to OUT.npz.
"""

from __future__ import annotations

import os
import subprocess
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import make_config, random_batch, random_weights, tensorflow_graph_optimizer_off  # noqa: E402

tensorflow_graph_optimizer_off()
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration, training  # noqa: E402


def fitted(devices, stacked, optimizer, max_grad_norm=None):
    """(params after one fit update on `stacked` under MirroredStrategy(devices), its loss)."""
    strategy = tf.distribute.MirroredStrategy(devices)
    config = make_config("tiny")
    with strategy.scope():
        model = TFBlenderbotForConditionalGeneration(config)
        model.load_weights_dict(random_weights(config, seed=0))
        trainer = training.Trainer(model, max_grad_norm=max_grad_norm)
        trainer.compile(optimizer=optimizer(), jit_compile=False)
    losses = trainer.fit(training.distribute(strategy, stacked), verbose=0).history["loss"]
    return model.state_dict(), np.array(losses).reshape(-1)  # each a [1] array (training.Trainer)


def keras_fitted(devices, batch, compiled_loss: bool):
    """(params, reported loss) after one plain Keras `fit` step (SGD 0.5, the whole batch) on the model itself
    under MirroredStrategy(devices): its own loss, or a compiled Keras loss with the labels as y."""
    strategy = tf.distribute.MirroredStrategy(devices)
    config = make_config("tiny")
    with strategy.scope():
        model = TFBlenderbotForConditionalGeneration(config)
        model.load_weights_dict(random_weights(config, seed=0))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100) if compiled_loss else None
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=False)
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if compiled_loss:
        history = model.fit(x, batch["labels"], batch_size=4, shuffle=False, verbose=0)
    else:
        history = model.fit({**x, "labels": batch["labels"]}, batch_size=4, shuffle=False, verbose=0)
    return model.state_dict(), np.array(history.history["loss"])


def keras_main(out):
    """The model in Keras' own fit (no training.Trainer), in a process of its own: a MirroredStrategy made in a
    process whose earlier strategies ran collectives met theirs (TensorFlow reuses the collective keys). Rows
    with as many label tokens each, so each replica's mean is the batch's."""
    results = {}
    even = random_batch(make_config("tiny"), batch=4, src_len=9, tgt_len=7, seed=1, pad=False)
    for compiled_loss in (False, True):
        name = f"keras2{'-compiled' if compiled_loss else ''}"
        params, loss = keras_fitted(["/cpu:0", "/cpu:1"], even, compiled_loss)
        results.update({f"{name}/{k}": v for k, v in params.items()}, **{f"{name}/loss": loss})
    np.savez(out, **results)


def main():
    out = sys.argv[1]
    batch = random_batch(make_config("tiny"), batch=4, src_len=9, tgt_len=7, seed=1)
    one = {k: batch[k][:, None] for k in ("input_ids", "attention_mask", "labels")}  # [4 rows, 1 micro, length]
    two = {k: np.stack([batch[k][0::2], batch[k][1::2]], axis=1) for k in one}     # [2 rows, 2 micros, length]
    two_cpus = ["/cpu:0", "/cpu:1"]
    results = {}
    sgd = lambda: keras.optimizers.SGD(0.5)  # noqa: E731
    for name, params in (("accum", fitted(two_cpus, two, sgd)[0]),
                         ("clip2", fitted(two_cpus, one, sgd, max_grad_norm=0.5)[0])):
        results.update({f"{name}/{k}": v for k, v in params.items()})
    subprocess.run([sys.executable, __file__, out + ".keras.npz", "--keras"], check=True)
    results.update(np.load(out + ".keras.npz"))
    np.savez(out, **results)
    print("replicas: 2", flush=True)


if __name__ == "__main__":
    keras_main(sys.argv[1]) if sys.argv[2:] == ["--keras"] else main()
