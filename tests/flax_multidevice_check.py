"""Multi-device check of the Flax train step; run as a script (it prints PASS/FAIL lines, exit status 1 on FAIL).

On CPU, fake several devices before JAX starts:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/flax_multidevice_check.py
On a GPU machine run it as it is: it uses every local device (one device is fine too).

Checks, on a tiny random model and one global batch:
1. a pmap step over all local devices gives the same updated params as a jit step on one device;
2. a jit step over a Mesh with NamedSharding (batch split along 'data') gives the same params too;
3. a few jit steps lower the loss;
4. jitted greedy and beam generate run and give the same tokens as the eager step-by-step decode.

With --devices-only it runs checks 1 and 2 alone (the suite's test: its own tests cover 3 and 4 on one device).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb import GenerationConfig  # noqa: E402
from blenderbot_mb.checkpoint_msgpack import params_from_tensors  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, training  # noqa: E402

TOL = float(os.environ.get("FLAX_CHECK_TOL", "1e-5"))
failures = []


def report(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def main():
    devices = jax.local_devices()
    n = len(devices)
    print(f"devices: {n} x {devices[0].platform} ({devices[0].device_kind})", flush=True)
    config = make_config("tiny")
    params = jax.tree_util.tree_map(jnp.asarray, params_from_tensors(
        random_weights(config, seed=0), config, "BlenderbotForConditionalGeneration"))
    model = FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)
    batch = random_batch(config, batch=2 * n, src_len=9, tgt_len=7, seed=1)
    batch = {k: v.astype(np.int32) for k, v in batch.items() if k != "decoder_input_ids"}

    def fresh_state():
        # plain SGD: the update is the gradient itself, so any difference in the averaged gradient shows
        # (Adam's first step is lr * sign(grad), which would hide a mis-scaled gradient)
        return training.create_train_state(model, optimizer=optax.sgd(0.5))

    # 1. single device jit vs pmap
    jit_step = jax.jit(training.make_train_step(model))
    single, m_single = jit_step(jax.device_put(fresh_state(), devices[0]), jax.device_put(batch, devices[0]))
    pmap_step = jax.pmap(training.make_train_step(model, axis_name="batch"), axis_name="batch")
    replicated, m_pmap = pmap_step(training.replicate(fresh_state()), training.shard_batch(batch, n))
    pmapped = training.unreplicate(replicated)
    d = max_diff(single.params, pmapped.params)
    moved = max_diff(single.params, model.params)
    report("the jit step changes the params", moved > 1e-3, f"(max |update| {moved:.2e})")
    report(f"pmap step over {n} devices == jit step on one device", d <= TOL, f"(max |diff| {d:.2e})")
    d_loss = abs(float(m_single["loss"]) - float(training.unreplicate(m_pmap)["loss"]))
    report("pmap loss == jit loss", d_loss <= TOL, f"(|diff| {d_loss:.2e})")

    # 2. Mesh / NamedSharding data parallel
    mesh = training.data_parallel_mesh()
    state, sharded_batch = training.place_on_mesh(fresh_state(), batch, mesh)
    sharded, _ = jax.jit(training.make_train_step(model))(state, sharded_batch)
    d = max_diff(single.params, sharded.params)
    report(f"NamedSharding step over {n} devices == jit step on one device", d <= TOL, f"(max |diff| {d:.2e})")

    if "--devices-only" in sys.argv[1:]:
        print("ALL PASS" if not failures else f"FAILED: {', '.join(failures)}", flush=True)
        return 1 if failures else 0

    # 3. a few steps lower the loss
    state = training.create_train_state(model, learning_rate=1e-2, weight_decay=0.01, warmup_steps=2,
                                        total_steps=10, max_grad_norm=1.0)
    losses = []
    for _ in range(8):
        state, metrics = jit_step(state, batch)
        losses.append(float(metrics["loss"]))
    report("8 jit steps lower the loss", losses[-1] < losses[0] - 0.5, f"({losses[0]:.3f} -> {losses[-1]:.3f})")

    # 4. jitted generate on the default device vs an eager cached decode
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
    plain = GenerationConfig(max_length=8, decoder_start_token_id=1, eos_token_id=2, pad_token_id=0)
    out = np.asarray(model.generate(ids, mask, generation_config=plain).sequences)
    enc = model.encode(ids, mask)
    cache = model.init_cache(2, 8)
    tokens = [np.full((2,), config.decoder_start_token_id)]
    done = np.zeros(2, bool)
    for _ in range(7):
        o = model.decode(tokens[-1][:, None], enc, mask, past_key_values=cache)
        cache = o.past_key_values
        nxt = np.where(done, config.pad_token_id, np.asarray(o.logits[:, -1]).argmax(-1))
        done |= nxt == config.eos_token_id
        tokens.append(nxt)
        if done.all():
            break
    eager = np.stack(tokens, 1)
    report("jitted greedy generate == eager cached decode", eager.shape == out.shape and (eager == out).all())
    beams = model.generate(ids, mask, max_length=8, num_beams=3, num_return_sequences=2, min_length=2)
    report("jitted beam generate runs", beams.sequences.shape[0] == 4, f"(shape {tuple(beams.sequences.shape)})")
    print("ALL PASS" if not failures else f"FAILED: {', '.join(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
