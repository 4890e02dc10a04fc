"""labeling/preferences.py: rankings -> pairs, majority votes, agreement; exact hand-computed cases."""

from __future__ import annotations

import math

import pytest

from align.labeling.preferences import (
    AgreementStats,
    Pair,
    Vote,
    agreement,
    kendall_tau,
    majority,
    pair_count,
    pairwise_agreement,
    ranking_to_pairs,
)

# Item -> rank (1 = best). Annotator B swaps the adjacent middle pair of A.
A = {0: 1, 1: 2, 2: 3, 3: 4}
B = {0: 1, 1: 3, 2: 2, 3: 4}


def test_pair_counts_are_k_choose_2():
    assert [pair_count(k) for k in (0, 1, 2, 3, 4, 7)] == [0, 0, 1, 3, 6, 21]


def test_four_way_ranking_gives_six_pairs_best_first():
    ranks = {0: 2, 1: 4, 2: 1, 3: 3}  # best to worst: 2, 0, 3, 1
    assert ranking_to_pairs(ranks) == [Pair(2, 0), Pair(2, 3), Pair(2, 1), Pair(0, 3), Pair(0, 1), Pair(3, 1)]
    assert len(ranking_to_pairs(ranks)) == pair_count(4)
    assert all(not p.tie for p in ranking_to_pairs(ranks))


def test_ties_skipped_or_kept():
    ranks = {0: 1, 1: 1, 2: 2, 3: 2}
    assert ranking_to_pairs(ranks, "skip") == [Pair(0, 2), Pair(0, 3), Pair(1, 2), Pair(1, 3)]
    assert ranking_to_pairs(ranks, "keep") == [Pair(0, 1, True), Pair(0, 2), Pair(0, 3), Pair(1, 2), Pair(1, 3),
                                               Pair(2, 3, True)]
    assert ranking_to_pairs({0: 1, 1: 1}) == []
    with pytest.raises(ValueError, match="ties="):
        ranking_to_pairs(ranks, "drop")
    with pytest.raises(ValueError, match="rank of item 1"):
        ranking_to_pairs({0: 1, 1: 0})


def test_one_swapped_adjacent_pair_agreement_and_tau():
    assert agreement(A, B) == (5, 6)
    assert kendall_tau(A, B) == pytest.approx(2 / 3)  # tau-a = tau-b without ties: (5 - 1) / 6
    assert kendall_tau(A, A) == 1.0
    assert kendall_tau(A, {i: 5 - r for i, r in A.items()}) == -1.0


def test_kendall_tau_b_with_ties():
    tied = {0: 1, 1: 1, 2: 2}
    strict = {0: 1, 1: 2, 2: 3}
    # C = 2 ((0,2), (1,2)), D = 0; untied pairs: 2 in `tied`, 3 in `strict` -> 2 / sqrt(6)
    assert kendall_tau(tied, strict) == pytest.approx(2 / math.sqrt(6))
    assert agreement(tied, strict) == (2, 3)
    assert agreement(tied, tied) == (3, 3)  # a tie agrees with a tie
    assert kendall_tau({0: 1, 1: 1}, strict) is None  # all tied: undefined
    assert kendall_tau({0: 1}, {0: 1}) is None


def test_majority_of_three_annotators():
    first = {0: 1, 1: 2, 2: 3}  # 0 > 1 > 2
    second = {0: 2, 1: 1, 2: 3}  # 1 > 0 > 2
    third = {0: 1, 1: 3, 2: 2}  # 0 > 2 > 1
    assert majority([first, second, third]) == [Vote(0, 1, False, 2, 1, 0), Vote(0, 2, False, 3, 0, 0),
                                                Vote(1, 2, False, 2, 1, 0)]
    # One ranking: the same pairs as ranking_to_pairs, in the same order.
    ranks = {0: 2, 1: 4, 2: 1, 3: 3}
    assert [(v.winner, v.loser) for v in majority([ranks])] == [(p.winner, p.loser) for p in ranking_to_pairs(ranks)]


def test_majority_ties():
    first = {0: 1, 1: 1, 2: 2}  # 0 = 1 > 2
    second = {0: 1, 1: 2, 2: 2}  # 0 > 1 = 2
    third = {0: 2, 1: 1, 2: 2}  # 1 > 0 = 2
    # (0,1): tie / 0 / 1 -> undecided; (0,2) and (1,2): won twice, tied once.
    assert majority([first, second, third]) == [Vote(0, 2, False, 2, 0, 1), Vote(1, 2, False, 2, 0, 1)]
    assert majority([first, second, third], ties="keep") == [Vote(0, 1, True, 1, 1, 1), Vote(0, 2, False, 2, 0, 1),
                                                             Vote(1, 2, False, 2, 0, 1)]
    # Ties outvote an order.
    assert majority([{0: 1, 1: 1}, {0: 1, 1: 1}, {0: 2, 1: 1}], ties="keep") == [Vote(0, 1, True, 0, 1, 2)]
    # Two annotators who disagree: no majority.
    assert majority([{0: 1, 1: 2}, {0: 2, 1: 1}]) == []
    assert majority([{0: 1, 1: 2}, {0: 2, 1: 1}], ties="keep") == [Vote(0, 1, True, 1, 1, 0)]
    assert majority([]) == []
    with pytest.raises(ValueError, match="different items"):
        majority([{0: 1, 1: 2}, {0: 1, 2: 2}])


def test_pairwise_agreement_over_records():
    stats = pairwise_agreement({
        "r1": {"ann": A, "bea": B},  # 5 of 6, tau 2/3
        "r2": {"ann": A},  # one annotator: not counted
        "r3": {"ann": A, "bea": A, "cal": B},  # ann-bea 6/6 (tau 1), ann-cal 5/6, bea-cal 5/6
    })
    assert stats == AgreementStats(records=2, comparisons=4, pairs_compared=24, pairs_agreed=21,
                                   agreement=pytest.approx(21 / 24), mean_tau=pytest.approx((2 / 3 * 3 + 1) / 4))
    empty = pairwise_agreement({"r1": {"ann": A}})
    assert empty.records == 0 and empty.agreement is None and empty.mean_tau is None
