"""Gold preferences: what simulated annotators rank by, and what success is measured under, never trained on.

The standard way to study RLHF without a crowd (AlpacaFarm, Dubois et al. 2023; Gao et al. 2022, "Scaling Laws
for Reward Model Overoptimization"): simulated annotators rank by a *gold* preference, the reward model is a
*proxy* learned only from their rankings, the policy is optimized against the proxy, and the result is measured
under the gold, which neither the reward model nor the policy ever saw.

A gold scores one response to one prompt (higher = preferred). Its spec is one of:

- a built-in rule, by name (`BUILTIN_RULES`): ``sentiment`` (VADER's compound score of the response, -1..1: a
  lexicon of 7,500 words each rated by 10 people, validated against human ratings of movie reviews, tweets and
  editorials; Hutto & Gilbert 2014), ``shorter`` / ``longer`` (characters, stripped), ``keyword:WORD`` (containing
  WORD, case-insensitive, first; then longer first);
- a Python callable ``module:function`` taking ``(prompt, response)`` and returning a number (the current folder
  is importable, as for ``python -m``);
- a reward model: a registry reference (``reward:3``) or a folder saved by ``align reward`` (its normalized score).

``load_gold`` checks the spec once, at start-up (the import, one probe call, the model's kind), so that a bad gold
ends in one line before any work, not mid-run.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

BUILTIN_RULES = {
    "sentiment": "VADER compound sentiment of the response (-1 negative .. +1 positive; Hutto & Gilbert 2014)",
    "shorter": "the shorter response (characters) wins",
    "longer": "the longer response (characters) wins",
    "keyword:WORD": "responses containing WORD win, then the longer one",
}
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_PROBE = ("What is the capital of France?", "The capital of France is Paris.")


@dataclass
class Gold:
    """A loaded gold preference: `score(prompts, responses)` -> one number per pair, higher = preferred."""

    spec: str
    kind: str  # "rule" | "callable" | "reward_model"
    description: str
    _score: Callable[[Sequence[str], Sequence[str]], list[float]]
    reward_model_path: str | None = None  # the folder, when the gold is a reward model

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"gold: {len(prompts)} prompts but {len(responses)} responses")
        scores = self._score(prompts, responses) if prompts else []
        bad = next((i for i, x in enumerate(scores) if not math.isfinite(x)), None)
        if bad is not None:  # a NaN would rank as a tie with everything and count as a loss in every comparison
            raise AlignError(f"gold: {self.spec} scored the response {_clip(responses[bad])!r} {scores[bad]}; a gold "
                             f"must give a finite number")
        return scores

    def as_record(self) -> dict:
        """What the registry and saved configs keep of it."""
        return {"spec": self.spec, "kind": self.kind, "description": self.description}


def load_gold(spec: str, option: str = "gold") -> Gold:
    """The gold preference named by `spec`; any problem ends in one `AlignError` line naming `option` and `spec`."""
    spec = str(spec).strip()
    if not spec:
        raise AlignError(f"{option}: empty; give a built-in rule ({', '.join(BUILTIN_RULES)}), a Python callable "
                         f"`module:function`, or a reward model (`reward:latest`)")
    rule = _builtin(spec, option)
    if rule is not None:
        return rule
    from align.registry import looks_like_ref

    if looks_like_ref(spec) or Path(spec).expanduser().exists():
        return _reward_model(spec, option)
    if _CALLABLE.fullmatch(spec):
        return _callable(spec, option)
    raise AlignError(f"{option}: {spec!r} is not a gold preference: give a built-in rule "
                     f"({', '.join(BUILTIN_RULES)}), a Python callable `module:function`, or a reward model "
                     f"(`reward:latest` or a folder saved by `align reward`)")


def rank(scores: Sequence[float], tie_margin: float = 0.0) -> list[int]:
    """Dense ranks (1 = best) of `scores`; a score within `tie_margin` of the best score of the current tie group
    shares its rank (ties do not chain: with margin 0.06, 1.0 and 0.95 tie, 0.9 ranks below both)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, current, previous = [0] * len(scores), 0, None
    for i in order:
        if previous is None or previous - scores[i] > tie_margin:
            current += 1
            previous = scores[i]
        ranks[i] = current
    return ranks


# --------------------------------------------------------------------------------------------------
# The three kinds

def _builtin(spec: str, option: str) -> Gold | None:
    if spec == "sentiment":
        analyzer = _vader(option)
        return Gold(spec, "rule", BUILTIN_RULES["sentiment"],
                    lambda prompts, responses: [analyzer.polarity_scores(r)["compound"] for r in responses])
    if spec in ("shorter", "longer"):
        sign = -1.0 if spec == "shorter" else 1.0
        return Gold(spec, "rule", BUILTIN_RULES[spec],
                    lambda prompts, responses: [sign * len(r.strip()) for r in responses])
    if spec.startswith("keyword:"):
        word = spec[len("keyword:"):].strip().lower()
        if not word:
            raise AlignError(f"{option}: {spec!r}: give the word, as in keyword:please")
        # Containing the word dominates; length (< 1 after n / (n + 1)) orders within each group.
        return Gold(spec, "rule", f"responses containing {word!r} win, then the longer one",
                    lambda prompts, responses: [float(word in r.lower()) + len(r.strip()) / (len(r.strip()) + 1)
                                                for r in responses])
    return None


def _vader(option: str):
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise AlignError(f"{option}: the `sentiment` rule needs the vaderSentiment package "
                         f"(pip install vaderSentiment==3.3.2; scripts/setup.sh installs it)") from None
    return SentimentIntensityAnalyzer()


def _callable(spec: str, option: str) -> Gold:
    module_name, function_name = spec.rsplit(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a gold module beside the config, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise AlignError(f"{option}: cannot import {module_name!r} for {spec!r}: {type(e).__name__}: {e} (the "
                         f"module must be importable from {Path.cwd()} or the environment)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AlignError(f"{option}: {module_name} has no function {function_name!r} ({spec!r})")

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [_number(function, spec, option, p, r) for p, r in zip(prompts, responses)]

    score([_PROBE[0]], [_PROBE[1]])  # fails now, in one line, rather than mid-run
    return Gold(spec, "callable", f"the Python function {spec}", score)


def _number(function, spec: str, option: str, prompt: str, response: str) -> float:
    try:
        value = function(prompt, response)
    except Exception as e:  # noqa: BLE001 - the user's function failed; say where
        raise AlignError(f"{option}: {spec} raised {type(e).__name__}: {e} on the response {_clip(response)!r} "
                         f"(to the prompt {_clip(prompt)!r})") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise AlignError(f"{option}: {spec} returned {_clip(repr(value))} ({type(value).__name__}) for the response "
                         f"{_clip(response)!r}; a gold must return a finite number (higher = preferred)")
    return float(value)


def _reward_model(spec: str, option: str) -> Gold:
    import gc

    from align.scoring import RewardScorer

    try:
        scorer = RewardScorer.load(spec)
    except AlignError as e:
        raise AlignError(f"{option}: {e}") from None
    folder = scorer.source
    del scorer  # checked now; loaded again for its first scores, so it holds no memory while other models run
    gc.collect()
    loaded: dict[str, RewardScorer] = {}

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if "scorer" not in loaded:
            loaded["scorer"] = RewardScorer.load(folder)
        return loaded["scorer"].score(list(prompts), list(responses))

    return Gold(spec, "reward_model", f"the reward model {spec}", score, reward_model_path=folder)


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
