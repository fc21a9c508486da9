"""Train a small byte-level BPE tokenizer on a built-in task's text and save it for transformers.

    python scripts/make_tokenizer.py --out=/tmp/jaxpost_bpe

A second vocabulary for the built-in tasks, made here with nothing downloaded: pass it as
`--config.tokenizer=DIR` to experiments.sft to train a model in it, e.g. a teacher that a
character-tokenizer student then distils across tokenizers (README, "Teachers as a service").
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxpost import tokenizers  # noqa: E402
from jaxpost.tasks import countdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the tokenizer's files")
    parser.add_argument("--vocab_size", type=int, default=320)
    parser.add_argument("--problems", type=int, default=200, help="Countdown problems to read")
    args = parser.parse_args()
    if not 260 <= args.vocab_size <= 65536:
        sys.exit(f"--vocab_size must lie in [260, 65536] (the 256 bytes and 4 specials), got "
                 f"{args.vocab_size}")  # fmt: skip
    task = countdown.Countdown()
    problems = task.prompts("train", args.problems, seed=0)
    corpus = [task.render_prompt(p) + task.render_completion(p, s)
              for p in problems for s in task.solutions(p)[:3]]  # fmt: skip
    tok = tokenizers.train_bpe(args.out, corpus, args.vocab_size)
    print(f"saved a byte-level BPE of {tok.vocab_size} tokens to {args.out}")


if __name__ == "__main__":
    main()
