#!/usr/bin/env python
"""Convert an original ParlAI Blenderbot checkpoint (`*.pt` pickle) into a Hugging Face-layout folder.

    python conversion/convert_parlai_checkpoint.py blender_90M/model out/ --to safetensors

The same as `blenderbot-mb convert SRC DST --from-parlai --allow-pickle`. Running this script is the
opt-in to reading a pickle (through torch.load(weights_only=True)); see conversion/README.md.
"""

from __future__ import annotations

import argparse
import sys

from blenderbot_mb.convert import FORMATS, convert_checkpoint
from blenderbot_mb.errors import BlenderbotError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the ParlAI checkpoint file (a pickle with 'model' and 'opt')")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", default="safetensors", choices=sorted(FORMATS), help="output format")
    parser.add_argument("--tokenizer", default=None,
                        help="folder with vocab.json/merges.txt or tokenizer.json to copy into the output")
    parser.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 2GB)")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst, to=args.to, allow_pickle=True, from_parlai=True,
                                 tokenizer=args.tokenizer, max_shard_size=args.max_shard_size)
    except BlenderbotError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
