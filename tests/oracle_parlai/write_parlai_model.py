"""Build a tiny ParlAI TransformerGeneratorModel (the pre-LayerNorm variant Blenderbot uses) with random
weights, save it as ParlAI saves checkpoints ({"model": state dict, "opt": options}), and save its
teacher-forced logits. Runs with ParlAI on the path: python write_parlai_model.py OUT_FOLDER"""

import os
import sys

import torch
from parlai.agents.transformer.modules import TransformerGeneratorModel
from parlai.core.opt import Opt


class Dictionary:
    """The part of ParlAI's DictionaryAgent the model reads: the special tokens and the size."""

    null_token, start_token, end_token, unk_token = "__null__", "__start__", "__end__", "__unk__"

    def __init__(self, size):
        specials = [self.null_token, self.start_token, self.end_token, self.unk_token]
        self.tok2ind = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(4, size)])}

    def __len__(self):
        return len(self.tok2ind)

    def __getitem__(self, token):
        return self.tok2ind[token]


def main(out):
    opt = Opt(dict(variant="prelayernorm", embedding_size=16, n_heads=4, n_layers=2, n_encoder_layers=2,
                   n_decoder_layers=3, ffn_size=32, n_positions=24, activation="gelu", embeddings_scale=True,
                   learn_positional_embeddings=True, dropout=0.0, attention_dropout=0.0, relu_dropout=0.0,
                   n_segments=0, output_scaling=1.0, share_word_embeddings=True, checkpoint_activations=False,
                   model_parallel=False, beam_size=2, beam_block_ngram=3, beam_context_block_ngram=3,
                   beam_min_length=1, beam_length_penalty=0.65, label_truncate=20, text_truncate=24,
                   dict_nulltoken="__null__", dict_starttoken="__start__", dict_endtoken="__end__",
                   dict_unktoken="__unk__"))
    torch.manual_seed(0)
    model = TransformerGeneratorModel(opt, Dictionary(50)).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor non-trivial (norms and biases too)
            p.add_(torch.randn_like(p) * 0.1)
    xs = torch.tensor([[5, 9, 13, 22, 2], [7, 8, 2, 0, 0]])
    ys = torch.tensor([[11, 12, 13, 2], [14, 15, 2, 0]])
    with torch.no_grad():
        logits, _ = model.decode_forced(model.encoder(xs), ys)
    torch.save({"model": model.state_dict(), "opt": dict(opt)}, os.path.join(out, "model.pt"))
    torch.save({"xs": xs, "ys": ys, "logits": logits}, os.path.join(out, "logits.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
