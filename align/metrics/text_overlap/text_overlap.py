"""Answer and text overlap as a local `evaluate` module, every score in [0, 1] and averaged over predictions:

* exact_match and f1: SQuAD's answer match; both texts normalized first (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed), f1 is the token-overlap F-measure.
* rougeL: ROUGE-L F-measure as the `rouge_score` package computes it without stemming (lower case, runs of
  non-alphanumeric characters split tokens, longest common subsequence).

Loads offline with ``evaluate.load("<this folder>")`` (align.evaluation.load_metric("text_overlap")); the hub's
"squad" and "rouge" metric scripts need the network (and rouge also the rouge_score package).
"""

import collections
import re
import string

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f_measure(common: int, predicted: int, expected: int) -> float:
    """Harmonic mean of precision common/predicted and recall common/expected (0 when nothing is shared)."""
    return 2 * common / (predicted + expected) if common else 0.0


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:  # both empty is a match; one empty is not
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    return f_measure(common, len(predicted), len(expected))


def lcs_length(a: list, b: list) -> int:
    """Longest common subsequence by dynamic programming, one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    predicted = _NON_ALPHANUMERIC.sub(" ", prediction.lower()).split()
    expected = _NON_ALPHANUMERIC.sub(" ", reference.lower()).split()
    return f_measure(lcs_length(predicted, expected), len(predicted), len(expected))


class TextOverlap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD exact match and token F1, and ROUGE-L F-measure, of predictions against one "
                        "reference each.",
            citation="Rajpurkar et al., SQuAD, 2016; Lin, ROUGE: A Package for Automatic Evaluation of Summaries, "
                     "2004.",
            inputs_description="predictions: list of str; references: list of str (one reference per prediction).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        n = max(len(predictions), 1)
        pairs = list(zip(predictions, references))
        return {"exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / n,
                "f1": sum(token_f1(p, r) for p, r in pairs) / n,
                "rougeL": sum(rouge_l(p, r) for p, r in pairs) / n}
