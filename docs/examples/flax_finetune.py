"""Fine-tune a small Flax Blenderbot on the packaged dialogue pairs, then reply.

    python docs/examples/flax_finetune.py --steps 30 --out /tmp/flax-bot

Trains a byte-level BPE tokenizer on src/blenderbot_mb/data/dialogues.txt (tab-separated
context/reply pairs), builds a tiny random model, runs jitted AdamW steps (one device; with several
devices pass --pmap to split each batch across them with jax.pmap), and saves the result.
"""

from __future__ import annotations

import argparse
import random

import jax

from blenderbot_mb import BlenderbotConfig
from blenderbot_mb.data import corpus_pairs
from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration, training
from blenderbot_mb.tokenizer import corpus_lines, train_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--pmap", action="store_true", help="data parallel over all local devices")
    ap.add_argument("--out", default=None, help="folder to save model + tokenizer")
    args = ap.parse_args(argv)

    tokenizer = train_tokenizer(corpus_lines(), vocab_size=400)
    config = BlenderbotConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, max_position_embeddings=64, scale_embedding=True, dropout=0.1)
    model = FlaxBlenderbotForConditionalGeneration(config, seed=0)
    pairs = corpus_pairs()
    width = 48
    state = training.create_train_state(model, learning_rate=args.lr, warmup_steps=5, total_steps=args.steps,
                                        weight_decay=0.01)
    if args.pmap:
        n = jax.local_device_count()
        step = jax.pmap(training.make_train_step(model, axis_name="batch"), axis_name="batch")
        state = training.replicate(state)
    else:
        step = jax.jit(training.make_train_step(model))
    rng = random.Random(0)
    losses = []
    for i in range(args.steps):
        chunk = rng.sample(pairs, args.batch_size)
        batch = training.make_batch(tokenizer, chunk, width=width)
        if args.pmap:
            batch = training.shard_batch(batch, n)
        state, metrics = step(state, batch)
        loss = float(training.unreplicate(metrics)["loss"] if args.pmap else metrics["loss"])
        losses.append(loss)
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {loss:.3f}")
    model.params = training.unreplicate(state).params if args.pmap else state.params

    context = pairs[0][0]
    inputs = tokenizer([context], return_tensors="np")
    reply = model.generate(inputs["input_ids"], num_beams=4, max_length=20, min_length=2).sequences
    print(f"{context!r} -> {tokenizer.decode(reply[0], skip_special_tokens=True)!r}")
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
    return losses


if __name__ == "__main__":
    main()
