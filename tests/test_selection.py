"""Active selection (labeling/selection.py): each strategy picks the constructed most-uncertain / most-disputed /
most-diverse items, with the score behind each choice; the fallbacks and the budget above the pool say so."""

import math

import pytest

from align.labeling.selection import (Selection, choose_completions, committee_variance, deduplicated, k_center,
                                      pair_entropy, select)


def test_pair_entropy_is_the_mean_bradley_terry_entropy():
    assert pair_entropy([0.0, 0.0]) == pytest.approx(1.0)
    p = 0.25  # sigmoid(-ln 3)
    assert pair_entropy([0.0, math.log(3)]) == pytest.approx(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    # three candidates: the mean over the three pairs
    expected = (pair_entropy([0.0, 1.0]) + pair_entropy([0.0, 2.0]) + pair_entropy([1.0, 2.0])) / 3
    assert pair_entropy([0.0, 1.0, 2.0]) == pytest.approx(expected)
    assert pair_entropy([1.0]) == 0.0


def test_uncertainty_picks_the_prompts_whose_candidates_the_reward_model_cannot_tell_apart():
    rewards = [[0.0, 0.0, 0.05], [5.0, -5.0, 0.0], [0.3, 0.0, -0.3], [10.0, 0.0, -10.0], [1.0, 1.0, 1.0]]
    chosen = select("uncertainty", 5, 3, rewards=rewards)
    assert chosen.strategy == "uncertainty" and chosen.indices == [4, 0, 2]
    assert chosen.scores[0] == pytest.approx(1.0) and chosen.scores == sorted(chosen.scores, reverse=True)
    assert not chosen.notes


def test_disagreement_picks_what_the_ensemble_disputes():
    agree = [[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]]
    members = [agree, [[2.1, 0.0], [0.0, -2.0], [1.0, -1.2]], [[1.9, 0.1], [0.1, 2.0], [1.1, -1.0]]]
    chosen = select("disagreement", 3, 1, member_rewards=members)
    assert chosen.indices == [1]  # the one item whose order one member reverses
    assert committee_variance([[0.0, 1.0], [0.0, 1.0]]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        committee_variance([[0.0, 1.0]])


def test_diversity_spends_the_budget_on_distinct_prompts_not_near_duplicates():
    clusters = [[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.98, 0.0, 0.02],  # three near-copies
                [0.0, 1.0, 0.0], [0.0, 0.98, 0.02], [0.0, 0.0, 1.0]]
    for seed in range(4):
        chosen = select("diversity", 6, 3, embeddings=clusters, seed=seed)
        groups = {0 if i < 3 else 1 if i < 5 else 2 for i in chosen.indices}
        assert groups == {0, 1, 2}, (seed, chosen.indices)
        assert chosen.scores[0] == 1.0 and all(s > 0.9 for s in chosen.scores[1:])
    indices, scores = k_center(clusters, 10)
    assert sorted(indices) == list(range(6)) and len(scores) == 6  # never more than the pool, each once


def test_random_is_seeded_and_the_budget_above_the_pool_takes_the_pool():
    assert select("random", 50, 5, seed=3).indices == select("random", 50, 5, seed=3).indices
    assert select("random", 50, 5, seed=3).indices != select("random", 50, 5, seed=4).indices
    everything = select("random", 4, 10)
    assert sorted(everything.indices) == [0, 1, 2, 3]
    assert everything.notes == ["budget 10 is more than the pool's 4 prompts: all of them are used"]


def test_without_a_reward_model_uncertainty_falls_back_to_diversity_and_says_so():
    chosen = select("uncertainty", 3, 2, embeddings=[[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])
    assert chosen.strategy == "diversity" and chosen.notes == ["no reward model yet: 'uncertainty' falls back to "
                                                               "'diversity'"]
    with pytest.raises(ValueError, match="needs reward-model scores"):
        select("disagreement", 3, 2)
    with pytest.raises(ValueError, match="unknown selection strategy 'loud'"):
        select("loud", 3, 2)


def test_metadata_keeps_the_strategy_score_and_rank_of_each_choice():
    chosen = Selection("uncertainty", [4, 0], [0.9999999, 0.5])
    assert chosen.metadata() == {4: {"selection": "uncertainty", "selection_score": 1.0, "selection_rank": 1},
                                 0: {"selection": "uncertainty", "selection_score": 0.5, "selection_rank": 2}}


def test_choose_completions_keeps_the_closest_rewards_or_the_spread():
    rewards = [3.0, 0.0, 0.1, 5.0, 0.05, -2.0]
    assert choose_completions("uncertainty", 3, rewards=rewards) == [1, 2, 4]
    spread = choose_completions("diversity", 2, embeddings=[[1, 0], [0.99, 0.01], [0, 1]], seed=0)
    assert len(spread) == 2 and 2 in spread
    assert choose_completions("random", 6, rewards=rewards) == list(range(6))


def test_duplicate_prompts_are_counted_once():
    keep, dropped = deduplicated(["Hello  world", "other", "hello world", "Other ", "new"])
    assert keep == [0, 1, 4] and dropped == 2


def test_the_offline_encoder_puts_paraphrases_closer_than_unrelated_prompts():
    from align.labeling.selection import embed

    vectors = embed(["How do I bake bread at home?", "What is a simple home bread recipe?",
                     "Explain the offside rule in football."])
    assert vectors.shape == (3, 384) and vectors.norm(dim=-1).allclose(vectors.new_ones(3))
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.3
