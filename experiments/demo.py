"""Smoke demo: build a tiny model, round-trip it through a Hugging Face checkpoint, generate.

    python -m experiments.demo --workdir=/tmp/jaxpost_demo

Prints the checkpoint path, the parameter count and a greedy continuation of a Countdown-style
prompt from the (untrained, so random-looking) model. It exercises model init, `save_hf`,
`load_hf` and the forward pass without any download.
"""

import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxpost import models  # noqa: E402
from jaxpost.models import hf  # noqa: E402

FLAGS = flags.DEFINE_string("workdir", "/tmp/jaxpost_demo", "where the checkpoint is written")
_PROMPT = flags.DEFINE_string("prompt", "3 5 7 -> 22:", "prompt text (characters)")
_STEPS = flags.DEFINE_integer("new_tokens", 16, "tokens to generate")

_ALPHABET = "\x00\x01\x02 0123456789+-*/=,:>\n"


def main(argv):
    del argv
    config = models.get_config("tiny", vocab_size=len(_ALPHABET))
    path = os.path.join(FLAGS.value, "tiny_hf")
    hf.save_hf(path, config, models.init(config, seed=0))
    config, params = hf.load_hf(path)
    ids = [_ALPHABET.index(c) for c in _PROMPT.value]
    for _ in range(_STEPS.value):
        logits = models.apply(config, params, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    text = "".join(_ALPHABET[i] for i in ids[len(_PROMPT.value) :])
    print(f"checkpoint: {path} ({config.num_params():,} parameters, family {config.family})")
    print(f"prompt: {_PROMPT.value!r} -> greedy continuation: {text!r}")


if __name__ == "__main__":
    app.run(main)
