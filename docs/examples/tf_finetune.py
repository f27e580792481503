"""Fine-tune a tiny Blenderbot with Keras `fit` on the packaged dialogue pairs (TensorFlow backend).

    KERAS_BACKEND=tensorflow python docs/examples/tf_finetune.py --out /tmp/tf-bot --epochs 20

Trains a byte-level BPE tokenizer on the corpus, builds a small model, fits it with AdamW and the model's own
masked LM loss, saves Hugging Face-layout checkpoints while training, and prints a reply. Pass `--model` to
start from an existing checkpoint folder (e.g. a converted blenderbot-400M-distill) instead.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from blenderbot_mb import BlenderbotConfig  # noqa: E402
from blenderbot_mb.data import read_pairs  # noqa: E402
from blenderbot_mb.tf import CheckpointCallback, TFBlenderbotForConditionalGeneration, make_dataset  # noqa: E402
from blenderbot_mb.tokenizer import BlenderbotTokenizer, corpus_lines, train_tokenizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tf-finetuned")
    parser.add_argument("--model", help="start from this checkpoint folder (with its tokenizer)")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "src",
                                                       "blenderbot_mb", "data", "dialogues.txt"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (on a GPU)")
    args = parser.parse_args(argv)

    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if args.model:
        tokenizer = BlenderbotTokenizer.from_pretrained(args.model)
        model = TFBlenderbotForConditionalGeneration.from_pretrained(args.model)
    else:
        tokenizer = train_tokenizer(corpus_lines(), vocab_size=400)
        config = BlenderbotConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, scale_embedding=True, dropout=0.1)
        model = TFBlenderbotForConditionalGeneration(config)
    pairs = read_pairs(args.data)
    data = make_dataset(tokenizer, pairs, batch_size=args.batch_size)

    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=args.lr))  # no loss: the model's own
    history = model.fit(data, epochs=args.epochs, verbose=2,
                        callbacks=[CheckpointCallback(args.out, every_n_epochs=max(1, args.epochs // 2),
                                                      keep_last=1, tokenizer=tokenizer)])
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    context, _ = pairs[0]
    inputs = tokenizer([context], return_tensors="tf")
    reply = model.generate(**inputs, num_beams=3, max_length=24, min_length=2)
    print("context:", context)
    print("reply:  ", tokenizer.batch_decode(reply, skip_special_tokens=True)[0])
    return history.history["loss"]


if __name__ == "__main__":
    main()
