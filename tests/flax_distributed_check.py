"""One process of a multi-process JAX training run on CPU (gloo collectives), for tests/test_flax_training.py.

    python tests/flax_distributed_check.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Every process builds the same tiny model and global batch, feeds its own rows and runs `training.Trainer`: one SGD
step with the params replicated, one SGD step with params sharded (FSDP-style) over two accumulated micro-batches,
then a few AdamW steps. Process 0 writes the params after each SGD step and the AdamW losses to OUT.npz.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import make_config, random_batch, random_weights  # noqa: E402

from blenderbot_mb.checkpoint_msgpack import params_from_tensors  # noqa: E402
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, training  # noqa: E402


def main():
    config = make_config("tiny")
    params = jax.tree_util.tree_map(np.asarray, params_from_tensors(
        random_weights(config, seed=0), config, "BlenderbotForConditionalGeneration"))
    model = FlaxBlenderbotForConditionalGeneration(config, _do_init=False, params=params)
    batch = random_batch(config, batch=4, src_len=9, tgt_len=7, seed=1)
    batch = {k: v.astype(np.int32) for k, v in batch.items() if k != "decoder_input_ids"}
    sgd = training.frozen_logits_bias(optax.sgd(1.0))
    results = {}
    # replicated params, one micro-batch: this process's rows of the global batch
    trainer = training.Trainer(model, sgd)
    rows = trainer.local_rows(4)
    trainer.update([{k: v[rows] for k, v in batch.items()}], lr=0.5, seed=0)
    results.update({f"replicated/{k}": v for k, v in model.state_dict(trainer.model_params()).items()})
    # params and optimizer state sharded, two accumulated micro-batches of one row per process
    trainer = training.Trainer(model, sgd, fsdp=True, fsdp_min_size=0)
    micro = [{k: v[rows][j:j + 1] for k, v in batch.items()} for j in range(2)]
    trainer.update(micro, lr=0.5, seed=0)
    results.update({f"fsdp_accum/{k}": v for k, v in model.state_dict(trainer.model_params()).items()})
    # AdamW with warmup: the loss falls
    trainer = training.Trainer(model, training.adamw(weight_decay=0.01), fsdp=True, fsdp_min_size=0)
    local = {k: v[rows] for k, v in batch.items()}
    results["losses"] = np.array([trainer.update([local], lr=min(step, 1) * 1e-2, seed=step)["loss"]
                                  for step in range(6)])
    results["rows"] = np.array([rows.start, rows.stop])
    if process_id == 0:
        np.savez(out, **results)
    print(f"process {process_id}: {jax.device_count()} devices, rows {rows.start}:{rows.stop}, "
          f"losses {np.round(results['losses'], 3).tolist()}", flush=True)


if __name__ == "__main__":
    main()
