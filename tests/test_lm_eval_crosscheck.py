"""align's multiple-choice log-likelihood scorer (align/evaluation.py) checked against EleutherAI's
lm-evaluation-harness, which loads the same tiny model from its folder itself (`HFLM(pretrained=<folder>)`).

align keeps its own scorer (its option packing makes it fast: benchmarks/eval_throughput.py); these tests hold it to
lm-eval's numbers, for a tokenizer that adds BOS (the tiny Llama) and one that adds nothing (the tiny GPT-NeoX):

- per request, the log-likelihood HFLM.loglikelihood gives (1e-4): contexts shared by several options (align's
  packed rows), a lone request, a context ending in a space or a newline, a long context;
- per question and overall, the acc and acc_norm of an lm-eval `multiple_choice` task over the same questions, run
  through lm-eval's own pipeline (prompt joining, argmax, acc_norm by characters).

Not compared: a context whose last token merges with the continuation's first (align scores the merged token,
lm-eval only the tokens past the context's own length) and an empty context.
"""

from __future__ import annotations

import json
import random

import pytest

from align import evaluation as ev
from tests import tiny_models

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt_neox"])
def model_folder(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def align_model(model_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_folder).eval(), AutoTokenizer.from_pretrained(model_folder)


@pytest.fixture(scope="module")
def hflm(model_folder):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_folder, device="cpu", batch_size=8)


def _requests() -> list[tuple[str, str]]:
    question = "Question: Which of these is a colour?\nAnswer:"
    long_context = " ".join(tiny_models.SAMPLE_TEXTS)
    return [(question, " red"), (question, " a small brown dog"), (question, " seven"),
            ("Hello, world! How are you today? ", "I am fine"), ("Hello, world! How are you today? ", "Good."),
            ("reverse: a b c\n", "c b a"), ("reverse: a b c\n", "a b c"),
            ("x", " y"),
            (long_context, " The end."), (long_context, " Fin.")]


def _questions(count: int, seed: int) -> list[ev.Question]:
    """Questions whose context ends in a non-space and whose options start with one, so that align's `continuation`
    and lm-eval's target delimiter (one space) join them the same way; the answers are set later."""
    words = " ".join(tiny_models.SAMPLE_TEXTS).split()
    rng = random.Random(seed)

    def phrase(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    questions = [ev.Question(f"Question: {phrase(4, 24)}?\nAnswer:",
                             [phrase(1, 6) for _ in range(rng.choice((2, 3, 4)))], answer=0) for _ in range(count)]
    assert all(ev.continuation(q.context, option) == " " + option for q in questions for option in q.options)
    return questions


def test_the_same_loglikelihoods_as_lm_eval(align_model, hflm):
    from lm_eval.api.instance import Instance

    model, tokenizer = align_model
    requests = _requests()
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=request, idx=i)
                 for i, request in enumerate(requests)]
    theirs = [total for total, _ in hflm.loglikelihood(instances, disable_tqdm=True)]
    ours = ev.loglikelihoods(model, tokenizer, requests, batch_size=4)
    assert ours == pytest.approx(theirs, abs=TOLERANCE)


def test_the_same_accuracies_as_an_lm_eval_multiple_choice_task(align_model, hflm, tmp_path):
    from lm_eval import simple_evaluate

    model, tokenizer = align_model
    questions = _questions(12, seed=0)
    # Answers from the naive scorer (one forward pass per option): the best option for even questions, the worst for
    # odd ones, so that a scorer that agrees gets exactly half of them right, not a chance score.
    for i, q in enumerate(questions):
        scores = [ev.reference_loglikelihood(model, tokenizer, q.context, ev.continuation(q.context, o))
                  for o in q.options]
        q.answer = (max if i % 2 == 0 else min)(range(len(scores)), key=scores.__getitem__)
    ours = ev.score_multiple_choice(model, tokenizer, questions, batch_size=4)

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"context": q.context, "options": q.options, "answer": q.answer}) + "\n"
                            for q in questions))
    task = {"task": "align_crosscheck", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "cache")},
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "options",
            "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    evaluated = simple_evaluate(model=hflm, tasks=[task], log_samples=True)
    samples = sorted(evaluated["samples"]["align_crosscheck"], key=lambda sample: sample["doc_id"])
    results = evaluated["results"]["align_crosscheck"]

    assert ours.acc == 0.5
    assert ours.correct == [int(sample["acc"]) for sample in samples]
    assert ours.correct_norm == [int(sample["acc_norm"]) for sample in samples]
    assert (ours.acc, ours.acc_norm) == pytest.approx((results["acc,none"], results["acc_norm,none"]))
    theirs = [[total for total, _ in sample["filtered_resps"]] for sample in samples]
    for mine, lm_eval_scores in zip(ours.logprobs, theirs):
        assert mine == pytest.approx(lm_eval_scores, abs=TOLERANCE)
