"""transformers 4.x Flax generate under jax.jit, for speed_table.py, in a Python environment of its own.

    python hf4_flax_worker.py FOLDER DTYPE

FOLDER holds Hugging Face's config.json and flax_model.msgpack. Reads one JSON request a line on stdin,
{"ids": [[...]], "mask": [[...]], "settings": {...}}, and answers one line: {"ids": [[...]]} or
{"error": "..."}. The first request with new settings compiles; speed_table.py warms every workload up
before it times. Imports nothing of blenderbot_mb: it runs where transformers 4.x is installed.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import transformers


def main():
    folder, dtype = sys.argv[1], getattr(jnp, sys.argv[2])
    model = transformers.FlaxBlenderbotForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), model.params)
    compiled = {}
    print(json.dumps({"ready": f"transformers {transformers.__version__}, jax {jax.__version__}, "
                               f"{jax.devices()[0].platform}"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        settings = dict(request["settings"])
        key = json.dumps(settings, sort_keys=True)
        try:
            if settings.pop("encoder_no_repeat_ngram_size", 0):
                raise NotImplementedError("transformers' Flax generate has no encoder_no_repeat_ngram_size")
            if key not in compiled:
                compiled[key] = jax.jit(lambda p, ids, mask, s=settings: model.generate(
                    ids, attention_mask=mask, params=p, **s).sequences)
            out = compiled[key](params, jnp.asarray(request["ids"], jnp.int32), jnp.asarray(request["mask"], jnp.int32))
            reply = {"ids": np.asarray(out).tolist()}
        except Exception as e:  # the table shows it as n/a with this reason
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
