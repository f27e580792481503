"""The embedded default model: a tiny Blenderbot built on this machine on first use, then cached.

Until published weights can ship with the package, `blenderbot-mb chat` / `generate` without `--model`
use this: a byte-level BPE trained on the packaged corpus (`data/dialogues.txt`, `user<TAB>bot` lines),
a 2+2-layer model of width 96, fine-tuned with the PyTorch backend until its greedy reply to every
corpus prompt is the corpus reply. It memorizes 40 exchanges: a demo of the whole pipeline, not a
chatbot. Building is seeded and takes well under a minute on two CPU cores.

The cache lives in `$BLENDERBOT_MB_HOME/tiny-default-v1` (default `~/.cache/blenderbot-mb/`). It is
built in a temporary folder beside it and renamed when complete, so a half-built model is never used.

    >>> from blenderbot_mb.default_model import default_model_path
    >>> folder = default_model_path()          # builds on first call    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time

NAME = "tiny-default-v1"  # bump when the recipe changes, so old caches are not reused
SEED = 0
TOKENIZER_VOCAB = 1000
ARCHITECTURE = dict(d_model=96, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                    max_position_embeddings=128, scale_embedding=True, dropout=0.0, activation_function="gelu",
                    encoder_no_repeat_ngram_size=0)
# greedy, short replies: the settings `generate` uses unless the caller overrides them
GENERATION = dict(num_beams=1, max_length=40, min_length=0, no_repeat_ngram_size=0,
                  encoder_no_repeat_ngram_size=0, forced_eos_token_id=2)
MAX_STEPS = 1500
LEARNING_RATE = 3e-3
MIN_MARGIN = 1.0  # stop once every reply token beats the runner-up logit by this much


def home() -> str:
    """$BLENDERBOT_MB_HOME, else $XDG_CACHE_HOME/blenderbot-mb, else ~/.cache/blenderbot-mb."""
    if os.environ.get("BLENDERBOT_MB_HOME"):
        return os.path.expanduser(os.environ["BLENDERBOT_MB_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "blenderbot-mb")


def default_model_path(build: bool = True, progress: bool = True, rebuild: bool = False) -> str:
    """The folder of the default model; built first if missing (and `build`), else CheckpointError."""
    from .errors import CheckpointError

    folder = os.path.join(home(), NAME)
    complete = os.path.isfile(os.path.join(folder, "config.json"))
    if complete and not rebuild:
        return folder
    if not build:
        raise CheckpointError(f"the default model is not built yet ({folder}); run `blenderbot-mb default-model`")
    os.makedirs(home(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}.", dir=home())
    try:
        build_default_model(tmp, progress=progress)
        if rebuild and os.path.isdir(folder):
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its model
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"default model: {folder}", file=sys.stderr)
    return folder


def build_default_model(folder: str, progress: bool = True) -> str:
    """Train the tokenizer and the tiny model from the corpus, and save both into `folder`."""
    from ._backends import require

    require("torch")
    import torch

    from . import BlenderbotConfig, GenerationConfig
    from .data import corpus_pairs, encode_pairs
    from .tokenizer import corpus_lines, train_tokenizer
    from .torch import BlenderbotForConditionalGeneration

    start = time.time()
    tokenizer = train_tokenizer(corpus_lines(), vocab_size=TOKENIZER_VOCAB)
    config = BlenderbotConfig.from_dict(dict(ARCHITECTURE, vocab_size=len(tokenizer)))
    batch = encode_pairs(tokenizer, corpus_pairs(), config.max_position_embeddings)
    input_ids, attention_mask, label_ids = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels"))

    threads = torch.get_num_threads()
    with _seeded(torch, SEED):
        # one thread: the model is tiny, results do not depend on the machine's core count, and a busy
        # CPU does not stall it (two threads on two shared cores ran 5x slower than one)
        torch.set_num_threads(1)
        model = BlenderbotForConditionalGeneration(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        bar = _progress_bar(MAX_STEPS, progress)
        try:
            for step in range(1, MAX_STEPS + 1):
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % 25 == 0 and _memorized(model, input_ids, attention_mask, label_ids):
                    break
        finally:
            if bar is not None:
                bar.close()
            torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation = dict(GENERATION, decoder_start_token_id=config.decoder_start_token_id,
                      bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                      pad_token_id=config.pad_token_id)
    GenerationConfig.from_dict(generation).save_pretrained(folder)
    if progress:
        print(f"built the default model in {time.time() - start:.0f} s", file=sys.stderr)
    return folder


def _memorized(model, input_ids, attention_mask, labels) -> bool:
    """Every reply token is the argmax under teacher forcing, by at least MIN_MARGIN (then greedy decoding
    reproduces the replies exactly, whatever small numeric differences cached decoding brings)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    model.train()
    mask = labels != -100
    top2 = logits.topk(2, dim=-1)
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    runner_up = torch.where(top2.indices[..., 0] == labels.clamp(min=0), top2.values[..., 1], top2.values[..., 0])
    return bool(((target - runner_up)[mask] > MIN_MARGIN).all())


@contextlib.contextmanager
def _seeded(torch, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="building the default model", unit="step", file=sys.stderr, leave=False)
