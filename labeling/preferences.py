"""Rankings -> preference pairs, majority votes and inter-annotator agreement: pure functions, no I/O.

A ranking is ``{item: rank}``: items are the original sample indices of one prompt's K completions,
rank 1 is the best, and equal ranks are ties (InstructGPT lets labelers tie outputs). Every ranking of
K items holds K-choose-2 comparisons (:func:`pair_count`); InstructGPT trains its reward model on all
of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

Ranks = Mapping[int, int]
TIES = ("skip", "keep")


class Pair(NamedTuple):
    """``winner`` ranked above ``loser``; with ``tie`` they share a rank (winner: the lower index)."""

    winner: int
    loser: int
    tie: bool = False


class Vote(NamedTuple):
    """A pair decided by a vote across annotators, with the votes behind it."""

    winner: int
    loser: int
    tie: bool
    wins: int  # annotators who put winner above loser
    losses: int  # annotators who put loser above winner
    ties: int  # annotators who tied them


def pair_count(k: int) -> int:
    """Comparisons in one ranking of ``k`` items: K choose 2."""
    return k * (k - 1) // 2 if k > 1 else 0


def ranking_to_pairs(ranks: Ranks, ties: str = "skip") -> list[Pair]:
    """All pairwise comparisons in one ranking, best first: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ...

    ``ties="skip"`` leaves tied items out; ``ties="keep"`` returns them as ``Pair(lower index, higher index,
    tie=True)`` in their place. Without ties a ranking of K items gives exactly :func:`pair_count` (K) pairs.
    """
    _check_ties(ties)
    _check_ranks(ranks)
    ordered = sorted(ranks, key=lambda item: (ranks[item], item))
    pairs = []
    for a, b in itertools.combinations(ordered, 2):
        if ranks[a] != ranks[b]:
            pairs.append(Pair(a, b))
        elif ties == "keep":
            pairs.append(Pair(a, b, True))
    return pairs


def majority(rankings: Sequence[Ranks], ties: str = "skip") -> list[Vote]:
    """One decision per item pair across several annotators' rankings of the same items.

    Each annotator votes ``a > b``, ``b > a`` or tie; the outcome with strictly more votes than each of the
    other two wins. Anything else (1 vs 1, or ties voted as often as the leading order) is a tie:
    left out with ``ties="skip"``, returned with ``tie=True`` with ``"keep"``. Pairs come in the order of the
    items' mean rank, so one ranking gives the pairs of :func:`ranking_to_pairs` in the same order.
    """
    _check_ties(ties)
    if not rankings:
        return []
    items = set(rankings[0])
    for ranks in rankings:
        _check_ranks(ranks)
        if set(ranks) != items:
            raise ValueError(f"rankings cover different items: {sorted(items)} vs {sorted(ranks)}")
    mean_rank = {item: sum(r[item] for r in rankings) / len(rankings) for item in items}
    ordered = sorted(items, key=lambda item: (mean_rank[item], item))
    votes = []
    for a, b in itertools.combinations(ordered, 2):
        wins = sum(r[a] < r[b] for r in rankings)
        losses = sum(r[a] > r[b] for r in rankings)
        tied = len(rankings) - wins - losses
        if wins > max(losses, tied):
            votes.append(Vote(a, b, False, wins, losses, tied))
        elif losses > max(wins, tied):
            votes.append(Vote(b, a, False, losses, wins, tied))
        elif ties == "keep":
            low, high = min(a, b), max(a, b)
            votes.append(Vote(low, high, True, *((wins, losses) if low == a else (losses, wins)), tied))
    return votes


def agreement(a: Ranks, b: Ranks) -> tuple[int, int]:
    """``(agreed, compared)`` over the item pairs both rankings hold: agreed when both put the pair in the
    same order, or both tie it."""
    common = sorted(set(a) & set(b))
    agreed = compared = 0
    for i, j in itertools.combinations(common, 2):
        compared += 1
        agreed += _sign(a[j] - a[i]) == _sign(b[j] - b[i])
    return agreed, compared


def kendall_tau(a: Ranks, b: Ranks) -> float | None:
    """Kendall's tau-b between two rankings over their common items (ties handled).

    ``tau_b = (C - D) / sqrt(N_a * N_b)``: C and D count the concordant and discordant item pairs, N_a (N_b) the
    pairs that ``a`` (``b``) does not tie. Without ties it equals tau-a, ``(C - D) / (n (n - 1) / 2)``: one
    adjacent swap among 4 items gives (5 - 1) / 6 = 2/3. None when undefined (fewer than 2 common items, or a
    ranking that ties everything).
    """
    common = sorted(set(a) & set(b))
    concordant = discordant = untied_a = untied_b = 0
    for i, j in itertools.combinations(common, 2):
        da, db = _sign(a[j] - a[i]), _sign(b[j] - b[i])
        untied_a += da != 0
        untied_b += db != 0
        if da and db:
            if da == db:
                concordant += 1
            else:
                discordant += 1
    if not untied_a or not untied_b:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


@dataclass(frozen=True)
class AgreementStats:
    """How much annotators agree, over records ranked by at least two of them."""

    records: int  # records with >= 2 annotators
    comparisons: int  # (record, annotator pair) comparisons
    pairs_compared: int  # item pairs compared across all of them
    pairs_agreed: int
    agreement: float | None  # pairs_agreed / pairs_compared (micro-average); None without overlap
    mean_tau: float | None  # mean Kendall tau-b over the comparisons where it is defined


def pairwise_agreement(by_record: Mapping[str, Mapping[str, Ranks]]) -> AgreementStats:
    """Agreement between every two annotators of the same record: ``{record: {annotator: ranks}}``.

    ``agreement`` is the share of item pairs on which two annotators agree (:func:`agreement`), pooled over
    all records and annotator pairs; ``mean_tau`` the mean :func:`kendall_tau` over the same comparisons.
    Records ranked by fewer than two annotators do not count.
    """
    records = comparisons = compared_total = agreed_total = 0
    taus = []
    for rankings in by_record.values():
        if len(rankings) < 2:
            continue
        records += 1
        for first, second in itertools.combinations(sorted(rankings), 2):
            comparisons += 1
            agreed, compared = agreement(rankings[first], rankings[second])
            agreed_total += agreed
            compared_total += compared
            tau = kendall_tau(rankings[first], rankings[second])
            if tau is not None:
                taus.append(tau)
    return AgreementStats(
        records=records, comparisons=comparisons, pairs_compared=compared_total, pairs_agreed=agreed_total,
        agreement=agreed_total / compared_total if compared_total else None,
        mean_tau=sum(taus) / len(taus) if taus else None,
    )


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: choose one of {', '.join(TIES)}")


def _check_ranks(ranks: Ranks) -> None:
    for item, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank of item {item!r} must be an integer >= 1, got {rank!r}")
