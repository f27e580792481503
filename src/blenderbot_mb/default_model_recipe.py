"""The recipe that builds the packaged default model from scratch.

    python -m blenderbot_mb.default_model_recipe all --parallel --work runs/default   # two GPUs

rebuilds every shipped file (`src/blenderbot_mb/data/default_model/`) from the `chitchat-dataset` package:

1. `prepare`: the corpus as whole conversations (`{"turns": [...]}` JSON lines, the format
   `blenderbot-mb train` expands into history/reply pairs), split by conversation (a fixed hash of the
   conversation id, never by message), a byte-level BPE tokenizer trained on the training split with the
   Blenderbot special tokens, one `config.json` per candidate size, and unigram/bigram baselines.
2. `train`: `blenderbot-mb train` for each candidate size (the PyTorch backend; a GPU if there is one).
3. `package`: the candidate with the best held-out loss, in fp16 safetensors, with its tokenizer and
   generation settings, into the package's data folder, and a `SHA256SUMS` file that the loader checks.
4. `evaluate`: replies to held-out contexts and to common openers, and the measures docs/default_model.md
   reports (`wordfreq` is needed for the real-word share).

Needs the `recipe` extra: `pip install 'blenderbot-mb[torch,recipe]'`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from importlib import resources

HELD_OUT_PERCENT = 4  # of conversations, chosen by a hash of their id
TOKENIZER_VOCAB = 8008  # the published models' vocabulary size (8008 ids, <mask> included)
SEED = 0
# candidate sizes: all fit the package limits (<= 50 MB of fp16 weights; a 20-token greedy reply in
# <= 250 ms on two CPU cores with the PyTorch backend)
CANDIDATES = {
    "small": dict(d_model=256, encoder_layers=2, decoder_layers=4, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
    "medium": dict(d_model=384, encoder_layers=2, decoder_layers=6, encoder_attention_heads=6,
                   decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
}
COMMON = dict(max_position_embeddings=128, scale_embedding=True, activation_function="gelu", dropout=0.1,
              attention_dropout=0.0, activation_dropout=0.0)
# what a user of a chatbot expects: beam search with n-gram blocking and a minimum length, as the
# published checkpoints, shortened to the small model's replies
GENERATION = dict(num_beams=5, min_length=6, max_length=40, length_penalty=0.65, no_repeat_ngram_size=3,
                  repetition_penalty=1.4,
                  encoder_no_repeat_ngram_size=0, forced_eos_token_id=2)
OPENERS = [
    "Hello, how are you?", "Hi!", "What's up?", "How was your day?", "What do you do for a living?",
    "Do you have any pets?", "What are your hobbies?", "Where are you from?", "What's your favorite food?",
    "Do you like music?", "What kind of music do you like?", "Have you seen any good movies lately?",
    "What are you doing this weekend?", "Do you like to travel?", "What's the weather like where you are?",
    "Do you play any sports?", "What's your favorite book?", "I'm feeling a bit tired today.",
    "Tell me about yourself.", "Good morning!",
]


# ---------------------------------------------------------------------- corpus
def chitchat_conversations() -> list[tuple[str, list[str]]]:
    """(conversation id, turns) of the chitchat-dataset package; a turn joins one sender's messages."""
    try:
        data = resources.files("chitchat_dataset").joinpath("dataset.json").read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise SystemExit("the recipe needs the corpus: pip install chitchat-dataset") from e
    out = []
    for conv_id, conversation in sorted(json.loads(data).items()):
        turns = []
        for turn in conversation["messages"]:
            text = " ".join(_clean(m["text"]) for m in turn)
            text = re.sub(r"\s+", " ", text).strip()
            if text:
                turns.append(text)
        if len(turns) >= 2:
            out.append((conv_id, turns))
    return out


def _clean(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def held_out(conv_id: str) -> bool:
    """The fixed split: a conversation is held out when the hash of its id says so."""
    return int(hashlib.sha256(conv_id.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def write_jsonl(path: str, conversations) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for _, turns in conversations:
            f.write(json.dumps({"turns": turns}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------- baselines
def reply_token_streams(tokenizer, conversations):
    """Each reply's ids as the model's loss sees them (leading space, closed by </s>)."""
    for _, turns in conversations:
        for reply in turns[1:]:
            yield tokenizer(" " + reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def ngram_baselines(tokenizer, train, held) -> dict:
    """Per-token cross-entropy (nats) of a unigram and an interpolated bigram model of the reply tokens.

    Unigram: add-one smoothing over the vocabulary. Bigram: Jelinek-Mercer interpolation with the
    unigram, its weight chosen on the first half of the held-out replies and scored on all of them."""
    vocab = len(tokenizer)
    uni, bi, ctx = Counter(), Counter(), Counter()
    for ids in reply_token_streams(tokenizer, train):
        prev = tokenizer.bos_token_id
        for t in ids:
            uni[t] += 1
            bi[prev, t] += 1
            ctx[prev] += 1
            prev = t
    total = sum(uni.values())

    def p_uni(t):
        return (uni[t] + 1) / (total + vocab)

    def bigram_nll(streams, lam):
        nll, n = 0.0, 0
        for ids in streams:
            prev = tokenizer.bos_token_id
            for t in ids:
                p_bi = bi[prev, t] / ctx[prev] if ctx[prev] else 0.0
                nll -= math.log(lam * p_bi + (1 - lam) * p_uni(t))
                n += 1
                prev = t
        return nll / n

    held_streams = list(reply_token_streams(tokenizer, held))
    tune = held_streams[: len(held_streams) // 2]
    lam = min((0.5, 0.6, 0.7, 0.8, 0.9), key=lambda lam: bigram_nll(tune, lam))
    uni_nll = -sum(math.log(p_uni(t)) for ids in held_streams for t in ids) / sum(map(len, held_streams))
    bi_nll = bigram_nll(held_streams, lam)
    return {"unigram": {"loss": uni_nll, "perplexity": math.exp(uni_nll)},
            "bigram": {"loss": bi_nll, "perplexity": math.exp(bi_nll), "interpolation": lam},
            "held_out_reply_tokens": sum(map(len, held_streams))}


# ---------------------------------------------------------------------- steps
def prepare(work: str) -> None:
    from . import BlenderbotConfig
    from .tokenizer import train_tokenizer

    os.makedirs(work, exist_ok=True)
    conversations = chitchat_conversations()
    train = [c for c in conversations if not held_out(c[0])]
    held = [c for c in conversations if held_out(c[0])]
    write_jsonl(os.path.join(work, "train.jsonl"), train)
    write_jsonl(os.path.join(work, "eval.jsonl"), held)
    texts = [t for _, turns in train for t in turns]
    tokenizer = train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB - 1, min_frequency=2)
    tokenizer.save_pretrained(os.path.join(work, "tokenizer"))
    for name, arch in CANDIDATES.items():
        config = BlenderbotConfig.from_dict(dict(COMMON, **arch, vocab_size=len(tokenizer)))
        config.save_pretrained(os.path.join(work, f"config-{name}"))
    stats = {"conversations": {"train": len(train), "held_out": len(held)},
             "replies": {"train": sum(len(t) - 1 for _, t in train), "held_out": sum(len(t) - 1 for _, t in held)},
             "vocab": len(tokenizer)}
    stats["baselines"] = ngram_baselines(tokenizer, train, held)
    with open(os.path.join(work, "prepare.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))


def train(work: str, name: str, device: str | None, max_steps: int, batch_size: int, lr: float,
          extra: list[str], nproc: int = 1, gpu: int | None = None, wait: bool = True):
    """`blenderbot-mb train` on one candidate (under torchrun with `nproc` processes, DDP, when > 1; on GPU
    `gpu` alone when given); returns its output folder, or the running process when `wait` is False."""
    out = os.path.join(work, f"run-{name}")
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1
                else [sys.executable])
    cmd = [*launcher, "-m", "blenderbot_mb.cli", "train",
           "--config", os.path.join(work, f"config-{name}", "config.json"),
           "--tokenizer", os.path.join(work, "tokenizer"),
           "--data", os.path.join(work, "train.jsonl"), "--eval-data", os.path.join(work, "eval.jsonl"),
           "--out", out, "--backend", "torch", "--max-steps", str(max_steps), "--batch-size", str(batch_size),
           "--lr", str(lr), "--warmup", str(max(1, max_steps // 20)), "--schedule", "cosine",
           "--eval-every", str(max(1, max_steps // 2)), "--save-every", str(max(1, max_steps // 3)),
           "--weight-decay", "0.01", "--precision", "bf16", "--seed", str(SEED), *extra]
    if device:
        cmd += ["--device", device]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu)) if gpu is not None else None
    print("+", " ".join(cmd), flush=True)
    if not wait:
        return subprocess.Popen(cmd, env=env)
    subprocess.run(cmd, check=True, env=env)
    return out


def final_eval_loss(run: str) -> float:
    """The last eval loss in a run's metrics file."""
    losses = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval_loss" in record:
                losses.append(record["eval_loss"])
    if not losses:
        raise SystemExit(f"{run}: no eval_loss in metrics.jsonl")
    return losses[-1]


def package(run: str, dest: str) -> None:
    """The run's final weights in fp16 with tokenizer, generation settings and SHA256SUMS, into `dest`."""
    from . import BlenderbotConfig, GenerationConfig
    from .checkpoint import read_weights, write_safetensors
    from .tokenizer import BlenderbotTokenizerFast

    run = os.path.join(run, "model")  # where `blenderbot-mb train` leaves the final model
    config = BlenderbotConfig.from_pretrained(run)
    weights = read_weights(run, config, "BlenderbotForConditionalGeneration", framework="numpy")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_safetensors({k: v.astype("float16") for k, v in weights.items()}, tmp, framework="numpy")
    config.save_pretrained(tmp)
    BlenderbotTokenizerFast.from_pretrained(run).save_pretrained(tmp)
    GenerationConfig.from_dict(dict(GENERATION, decoder_start_token_id=config.decoder_start_token_id,
                                    bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                    pad_token_id=config.pad_token_id)).save_pretrained(tmp)
    sums = []
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), "rb") as f:
            sums.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
    with open(os.path.join(tmp, "SHA256SUMS"), "w") as f:
        f.writelines(sums)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    print("".join(sums), end="")


# ---------------------------------------------------------------------- evaluation
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def repeats_a_word(text: str) -> bool:
    """A word immediately repeated ("of of")."""
    words = _words(text)
    return any(a == b for a, b in zip(words, words[1:], strict=False))


def evaluate(model_dir: str, work: str, n: int = 200, out: str | None = None) -> dict:
    """Replies to `n` held-out contexts and to OPENERS, with the measures docs/default_model.md reports."""
    import random

    from .conversation import build_conversation_ids
    from .tokenizer import BlenderbotTokenizerFast
    from .torch import BlenderbotForConditionalGeneration

    tokenizer = BlenderbotTokenizerFast.from_pretrained(model_dir)
    model = BlenderbotForConditionalGeneration.from_pretrained(model_dir, dtype="float32").eval()
    train_replies = set()
    with open(os.path.join(work, "train.jsonl"), encoding="utf-8") as f:
        for line in f:
            train_replies.update(t.strip().lower() for t in json.loads(line)["turns"])
    contexts = []
    with open(os.path.join(work, "eval.jsonl"), encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["turns"]
            contexts.extend(turns[:k] for k in range(1, len(turns)))
    contexts = random.Random(SEED).sample(contexts, n)

    def reply(turns):
        import torch

        ids = build_conversation_ids(tokenizer, turns, max_length=128)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]))
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()

    replies = [reply(c) for c in contexts]
    try:
        from wordfreq import zipf_frequency
    except ImportError:
        zipf_frequency = None
    words = [w for r in replies for w in _words(r)]
    report = {
        "contexts": n,
        "non_empty": sum(bool(r) for r in replies) / n,
        "no_repeated_word": sum(not repeats_a_word(r) for r in replies) / n,
        "not_a_training_reply": sum(r.lower() not in train_replies for r in replies) / n,
        "real_words": (sum(zipf_frequency(w, "en") > 0 for w in words) / len(words)
                       if zipf_frequency and words else None),
        "unknown_words": sorted({w for w in words if zipf_frequency and zipf_frequency(w, "en") == 0}),
        "openers": [[o, reply([o])] for o in OPENERS],
        "samples": [[c[-1], r] for c, r in list(zip(contexts, replies, strict=True))[:10]],
    }
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blenderbot_mb.default_model_recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "train", "package", "evaluate", "all"])
    parser.add_argument("--work", default="runs/default-model", help="working folder (data, runs)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="sizes to train, comma-separated")
    parser.add_argument("--device", default=None)
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) per run, DDP under torchrun")
    parser.add_argument("--parallel", action="store_true",
                        help="train the candidates at once, candidate i on GPU i alone (instead of --nproc)")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dest", default=os.path.join(os.path.dirname(__file__), "data", "default_model"))
    parser.add_argument("--train-arg", action="append", default=[], help="extra `blenderbot-mb train` argument")
    args = parser.parse_args(argv)
    start = time.time()
    names = [n for n in args.candidates.split(",") if n]
    if args.step in ("prepare", "all"):
        prepare(args.work)
    if args.step in ("train", "all"):
        if args.parallel:
            runs = [train(args.work, name, args.device, args.max_steps, args.batch_size, args.lr, args.train_arg,
                          gpu=i, wait=False) for i, name in enumerate(names)]
            failed = [name for name, run in zip(names, runs, strict=True) if run.wait() != 0]
            if failed:
                raise SystemExit(f"training failed for: {', '.join(failed)}")
        else:
            for name in names:
                train(args.work, name, args.device, args.max_steps, args.batch_size, args.lr, args.train_arg,
                      nproc=args.nproc)
    if args.step in ("package", "all"):
        losses = {n: final_eval_loss(os.path.join(args.work, f"run-{n}")) for n in names
                  if os.path.isdir(os.path.join(args.work, f"run-{n}"))}
        best = min(losses, key=losses.get)
        print(json.dumps({"eval_loss": losses, "chosen": best}))
        with open(os.path.join(args.work, "choice.json"), "w") as f:
            json.dump({"eval_loss": losses, "perplexity": {k: math.exp(v) for k, v in losses.items()},
                       "chosen": best}, f, indent=2)
        package(os.path.join(args.work, f"run-{best}"), args.dest)
    if args.step in ("evaluate", "all"):
        evaluate(args.dest, args.work, out=os.path.join(args.work, "evaluate.json"))
    print(f"done in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
