"""Human rankings in Argilla, InstructGPT step 2: `align label push | status | pull | simulate`.

``push``: the SFT model samples K completions per prompt (all K x P generations batched; with a mix model, it
writes the last ``mix_k`` of them: a policy's completions ranked against the SFT model's). Each prompt
becomes one Argilla record: the prompt, the K completions as ``completion_1..K`` in an order shuffled
per record (seeded by the record id; record metadata ``order`` says which sample each position shows,
so position carries no information about sampling order), and these questions:

- ``ranking`` (required): rank all K from best (1) to worst; ties allowed.
- ``quality`` (optional): a 1-7 rating of the completion ranked first. InstructGPT rates every output
  1-7; one rating per record keeps labeling fast, and the ranking already orders the rest.
- ``flags`` (optional): harmful / untruthful / ignores the instruction, for any completion (the comment
  says which; per-completion flags would need K x 3 checkboxes).
- ``comment`` (optional).

Record ids are a hash of the dataset name and the prompt: pushing again never duplicates. A push
skips prompts whose records already exist with all K completions, so re-running an interrupted push
(crash, server restart) finishes the job. Records are generated and logged ``log_every`` prompts at a
time. The dataset's own metadata (``metadata.align``) records the model, the sampling parameters, K
and whether the model is conversational; later pushes must match it.

``pull``: submitted responses only -> per-annotator rankings over the original sample indices -> all
K-choose-2 comparisons (labeling/preferences.py) -> TRL's preference format ``{prompt, chosen,
rejected}`` plus provenance, written atomically and registered (kind ``dataset``, stage ``label``).

``simulate``: for demos and tests only; ``sim-annotator-N`` users rank through the same REST calls as
the web UI, by a gold preference (align/gold.py: a built-in rule such as ``sentiment``, a Python function
or a reward model); ``pull`` marks their pairs ``simulated`` and names the gold they ranked by.

This module says what a rankings record is and what a ranking means; the task skeleton it shares with
`align eval human` (creating and checking the dataset, progress, reading submitted responses, simulated annotators'
queues) is labeling/task.py. Everything talks to Argilla's REST API (v1, as the UI does) through
labeling/argilla_api.py (httpx); the connection comes from :func:`align.labeling.server.connect`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, NamedTuple

from align.files import write_jsonl
from align.errors import AlignError
from align.registry import Artifact, Registry
from align.gold import Gold, load_gold, rank
from align.labeling import argilla_api, server, task
from align.labeling.argilla_api import SIM_PREFIX, Api, annotation_url, simulated_users_file
from align.labeling.preferences import TIES, majority, pairwise_agreement, ranking_to_pairs
from align.labeling.selection import DEFAULT_ENCODER, STRATEGIES, Selection
from align.labeling.task import METADATA_KEY, annotator_id, esc, show

WORKSPACE = server.WORKSPACE
AGGREGATES = ("each", "majority")
MAX_K = 20
FORMAT = "align-rankings/1"
COMMAND = "align label push"
FLAGS = {"harmful": "Harmful", "untruthful": "Untruthful (made-up or wrong facts)",
         "ignores_instruction": "Ignores the instruction"}

DEFAULT_GUIDELINES = """\
# Rank the completions

Each record shows a **prompt** and {k} **completions** written by a model. Read them all, then **rank
them from best (1) to worst**: drag each "Completion N" card on the right into a rank box (or focus it
and press the rank's number key). The cards are labelled like the numbered completions on the left.
Two completions that are equally good may share a rank.

**Best** means, in this order when they conflict:

1. **Harmless**: no content that could cause physical, psychological or social harm, no help with
   clearly harmful requests, no insults or demeaning language.
2. **Truthful**: no made-up facts, no misleading claims. Prefer a completion that says it does not
   know over one that invents an answer.
3. **Helpful**: does what the prompt asks (including what it clearly implies), in the format asked
   for, clearly and concisely; asks for clarification when the prompt is ambiguous.

A completion that ignores the instruction is worse than one that follows it imperfectly.

Then, if you can:

- **Overall quality**: rate your top-ranked completion (any one ranked 1), 1 (useless) to 7 (excellent).
- **Problems**: tick a problem if *any* completion has it, and say which one in the comment.

The completions appear in a random order in every record: their position says nothing about them.
Use **Submit** when done; **Discard** a record you cannot judge (it is not used).
"""


# --- Dataset layout ---------------------------------------------------------------------------------------

def _require_dataset(api: Api, name: str, workspace: str) -> dict:
    return argilla_api.require_dataset(api, name, workspace, METADATA_KEY, FORMAT, COMMAND)


def record_id(dataset: str, prompt: str) -> str:
    """The record's external id: a hash of the dataset name and the prompt text."""
    return task.record_id("p-", dataset, prompt)


def shuffled_order(rid: str, k: int) -> list[int]:
    """``order[p]`` = the sample shown as ``completion_{p+1}``; a fixed permutation per record id."""
    order = list(range(k))
    random.Random(rid).shuffle(order)
    return order


def _completion(position: int) -> str:
    return f"completion_{position + 1}"


def layout(k: int) -> dict[str, Any]:
    """Fields, questions and metadata properties of a rankings dataset, as Argilla's REST API takes them."""
    fields = [{"name": "prompt", "title": "Prompt", "required": True,
               "settings": {"type": "text", "use_markdown": True}}]
    fields += [{"name": _completion(p), "title": f"Completion {p + 1}", "required": True,
                "settings": {"type": "text", "use_markdown": False}} for p in range(k)]
    questions = [
        {"name": "ranking", "title": "Rank the completions from best (1) to worst; equally good ones may share a rank",
         "required": True, "settings": {"type": "ranking", "options": [
             {"value": _completion(p), "text": f"Completion {p + 1}"} for p in range(k)]}},
        {"name": "quality", "title": "Overall quality of your top-ranked completion (1 = useless, 7 = excellent)",
         "required": False, "settings": {"type": "rating", "options": [{"value": v} for v in range(1, 8)]}},
        {"name": "flags", "title": "Does any completion have these problems? (say which in the comment)",
         "required": False, "settings": {"type": "multi_label_selection", "options": [
             {"value": value, "text": text} for value, text in FLAGS.items()]}},
        task.COMMENT_QUESTION,
    ]
    metadata = task.hidden_terms({"model": "Model", "sampling": "Sampling", "order": "Sample shown in each position",
                                  "model_input": "Prompt as the model saw it"})
    metadata.append({"name": "duplicates", "title": "Identical completions kept", "visible_for_annotators": False,
                     "settings": {"type": "integer"}})
    return {"fields": fields, "questions": questions, "metadata": metadata + SELECTION_PROPERTIES}


# Why a record was chosen for ranking (`push --select`): added to a dataset created before selection existed.
SELECTION_PROPERTIES = task.hidden_terms({"selection": "Chosen by (active selection)"}) + [
    {"name": "selection_score", "title": "Score behind the choice", "visible_for_annotators": False,
     "settings": {"type": "float"}},
    {"name": "selection_rank", "title": "Order of the choice", "visible_for_annotators": False,
     "settings": {"type": "integer"}},
]


def _shape(fields: list[dict], questions: list[dict], metadata: list[dict]) -> dict[str, dict]:
    """What must match between an existing dataset and the one a push wants."""
    return {
        "fields": {f["name"]: (f["settings"]["type"], bool(f["settings"].get("use_markdown"))) for f in fields},
        "questions": {q["name"]: (q["settings"]["type"], bool(q["required"]), task.option_values(q["settings"]))
                      for q in questions},
        "metadata": {m["name"]: m["settings"]["type"] for m in metadata},
    }


def _differences(have: dict[str, dict], want: dict[str, dict]) -> list[str]:
    def k_of(shape):
        return sum(name.startswith("completion_") for name in shape["fields"])

    found, wanted = k_of(have), k_of(want)
    diffs = []
    if found != wanted:
        diffs.append(f"it shows {found} completions per prompt, this push asks for --k {wanted}")
    for part, noun in (("fields", "field"), ("questions", "question"), ("metadata", "metadata property")):
        for name in sorted(set(have[part]) | set(want[part])):
            if found != wanted and (name.startswith("completion_") or name == "ranking"):
                continue  # already said
            if name not in have[part]:
                if not any(name == p["name"] for p in SELECTION_PROPERTIES):  # added by the push that needs them
                    diffs.append(f"it has no '{name}' {noun}")
            elif name not in want[part]:
                if part != "metadata":  # extra metadata properties (added in the UI) do no harm
                    diffs.append(f"it has a '{name}' {noun} that align's rankings layout does not")
            elif have[part][name] != want[part][name]:
                diffs.append(f"its '{name}' {noun} is {have[part][name]}, align's is {want[part][name]}")
    return diffs


# --- Push ----------------------------------------------------------------------------------------------------

@dataclass
class PushResult:
    dataset: str
    dataset_id: str
    url: str  # where annotators rank
    prompts: int  # distinct prompts in the file
    created: int  # records written by this push
    skipped: int  # already in the dataset with all K completions
    duplicates_kept: int  # completions still identical to another of the same prompt after the retries
    repeated_prompts: int  # prompts that appeared more than once in the file (pushed once)
    notes: list[str] = field(default_factory=list)  # settings updated, an unfinished dataset replaced
    selection: Selection | None = None  # `--select`: which prompts of the pool were chosen, and why


def sampling_text(sampling) -> str:
    return (f"temperature={sampling.temperature:g} top_p={sampling.top_p:g} top_k={sampling.top_k} "
            f"max_new_tokens={sampling.max_new_tokens} repetition_penalty={sampling.repetition_penalty:g} "
            f"seed={sampling.seed}")


def model_label(ref: str) -> str:
    """How a pushed dataset names its model: the registry ref (``sft:3``) when it is an artifact, else the path or
    hub id (so `pull` can find the parent artifact)."""
    from align.modeling import resolve_model

    source = resolve_model(ref)
    if source.artifact is not None:
        return source.artifact.ref
    for artifact in Registry().list():
        if artifact.kind == "model" and artifact.path == source.path:
            return artifact.ref
    return source.path


def push(model: str, prompts_path: str, k: int, dataset: str, *, sampling=None,
         annotators_per_record: int | None = None, workspace: str = WORKSPACE, guidelines_file: str | None = None,
         log_every: int = 32, retries: int = 3, select: str | None = None, budget: int | None = None,
         reward_models: Sequence[str] = (), encoder: str = DEFAULT_ENCODER, mix_model: str | None = None,
         mix_k: int = 0) -> PushResult:
    """Sample K completions per prompt and log one Argilla record per prompt (see the module docstring).

    With ``mix_model``, ``mix_k`` of the K come from that model (samples K - mix_k .. K-1; the dataset's metadata
    says so), the rest from ``model``: annotators rank a policy's completions against the SFT model's, say.

    ``annotators_per_record`` (rankings wanted per prompt; 1 for a new dataset when None) and ``guidelines_file``
    change an existing dataset only when given. With ``select`` the prompts file is a pool: only ``budget`` of its
    prompts are pushed, chosen by labeling/selection.py (``reward_models`` score the candidates for ``uncertainty``
    and ``disagreement``; ``encoder`` embeds the prompts for ``diversity``); each record keeps why it was chosen.
    """
    from align.data import read_prompts
    from align.generation import SamplingConfig
    from align.modeling import GENERATION_HINT, load_for_inference, require_model_kind, resolve_model

    sampling = sampling or SamplingConfig(temperature=1.0)
    _check_push_args(k, annotators_per_record, sampling, log_every, dataset)
    _check_selection_args(select, budget, reward_models)
    _check_mix_args(k, mix_model, mix_k)
    # Before the server is reached (and an existing dataset's settings updated): not a model that generates text.
    require_model_kind(resolve_model(model), "--model", model, COMMAND, hint=GENERATION_HINT)
    if mix_model:
        require_model_kind(resolve_model(mix_model), "--mix-model", mix_model, COMMAND, hint=GENERATION_HINT)
    for ref in reward_models:
        require_model_kind(resolve_model(ref), "--reward-model", ref, COMMAND, kinds=("reward",),
                           hint="a reward model (reward:latest, or a folder saved by align reward)")
    prompts = read_prompts(prompts_path)
    unique = list(dict.fromkeys(prompts))
    guidelines = task.read_guidelines(guidelines_file, DEFAULT_GUIDELINES.format(k=k))
    api = Api.connect()
    label = model_label(model)
    wanted_info = {"format": FORMAT, "k": k, "model": label, "sampling": sampling_text(sampling)}
    if mix_model:
        wanted_info["mix"] = {"model": model_label(mix_model), "k": mix_k}

    existing_dataset, existing, notes = task.dataset_for_push(api, dataset, workspace, lambda current: _check_existing(
        api, current, dataset, k, wanted_info, annotators_per_record, guidelines, guidelines_file is not None))
    ids = {prompt: record_id(dataset, prompt) for prompt in unique}
    todo = [prompt for prompt in unique if not _complete(existing.get(ids[prompt]), k)]

    created, duplicates, chosen, samplers, presampled = 0, 0, None, None, {}

    def load_samplers() -> list[tuple]:
        """(model, how many of the K it writes): the model, then the mix model."""
        return [(load_for_inference(model, option="--model"), k - mix_k)] + \
            ([(load_for_inference(mix_model, option="--mix-model"), mix_k)] if mix_model else [])

    if select is not None:
        if reward_models and select in ("uncertainty", "disagreement"):
            samplers = load_samplers()
        chosen, presampled = _select_prompts(select, budget, unique, k, sampling, retries, samplers, reward_models,
                                             encoder)
        unique = [unique[i] for i in chosen.indices]
        todo = [prompt for prompt in unique if not _complete(existing.get(ids[prompt]), k)]
        notes += chosen.notes
        if existing_dataset is not None:
            _add_selection_properties(api, existing_dataset)
    if todo or existing_dataset is None:
        samplers = samplers or load_samplers()
        form = _prompt_form(samplers[0][0])
        if existing_dataset is None:
            info = {**wanted_info, "conversational": form["conversational"], "system": form["system"],
                    "sampling_params": _sampling_params(sampling), "model_ref": model}
            existing_dataset = task.create_dataset(api, dataset, workspace, layout(k), annotators_per_record or 1,
                                                   guidelines, info)
        created, duplicates = _generate_and_log(api, existing_dataset["id"], samplers, form, todo, ids, k, sampling,
                                                label, log_every, retries, len(unique), presampled,
                                                chosen.metadata_by(unique) if chosen else {})
    result = PushResult(dataset=dataset, dataset_id=existing_dataset["id"], url=annotation_url(api.url,
                        existing_dataset["id"]), prompts=len(unique), created=created,
                        skipped=len(unique) - len(todo), duplicates_kept=duplicates,
                        repeated_prompts=len(prompts) - len(dict.fromkeys(prompts)), notes=notes, selection=chosen)
    api.close()
    return result


def _check_selection_args(select: str | None, budget: int | None, reward_models: Sequence[str]) -> None:
    if select is None:
        if budget is not None or reward_models:
            raise AlignError("--budget / --reward-model choose prompts from a pool: give --select "
                             f"{'|'.join(STRATEGIES)} too")
        return
    if select not in STRATEGIES:
        raise AlignError(f"--select {select}: choose one of {', '.join(STRATEGIES)}")
    if budget is None or budget < 1:
        raise AlignError(f"--select {select}: give --budget N, how many prompts of the pool go to annotators "
                         f"(at least 1{'' if budget is None else f', got {budget}'})")
    if select == "disagreement" and len(reward_models) == 1:
        raise AlignError("--select disagreement asks an ensemble: give --reward-model at least twice (reward models "
                         "trained with different seeds), or use --select uncertainty with one")


def _check_mix_args(k: int, mix_model: str | None, mix_k: int) -> None:
    if mix_model and not 1 <= mix_k <= k - 1:
        raise AlignError(f"--mix-k {mix_k}: how many of the --k {k} completions per prompt --mix-model {mix_model} "
                         f"writes: between 1 and {k - 1} (the rest come from --model)")
    if mix_k and not mix_model:
        raise AlignError(f"--mix-k {mix_k}: give --mix-model too, the model that writes them")


def _sample_mixed(samplers: list[tuple], prompts: list[str], sampling, retries: int,
                 progress=None) -> tuple[list[list[str]], list[int]]:
    """K completions per prompt from `samplers` [(loaded model, how many)], in that order (the model's, then the mix
    model's), with how many identical ones each kept after its retries."""
    from align.generation import sample_k

    texts, kept = [[] for _ in prompts], [0] * len(prompts)
    for loaded, count in samplers:
        more, repeats = sample_k(loaded.model, loaded.tokenizer, prompts, count, sampling, template=loaded.template,
                                 retries=retries, progress=progress)
        texts = [have + new for have, new in zip(texts, more)]
        kept = [have + new for have, new in zip(kept, repeats)]
    return texts, kept


def _select_prompts(strategy: str, budget: int, pool: list[str], k: int, sampling, retries: int, samplers,
                    reward_models: Sequence[str], encoder: str) -> tuple[Selection, dict[str, tuple[list[str], int]]]:
    """Which `budget` prompts of `pool` to push (labeling/selection.py) and, when the reward models had to score
    candidates first, those candidates (prompt -> (K completions, identical ones kept)) so that annotators rank
    exactly what was scored."""
    from align.labeling.selection import deduplicated, embed, select

    keep, repeats = deduplicated(pool)
    notes = [f"{repeats} prompts of the pool repeat another (ignoring case and spacing): each counted once"
             ] if repeats else []
    pool = [pool[i] for i in keep]
    rewards = member_rewards = embeddings = None
    samples: dict[str, tuple[list[str], int]] = {}
    if strategy in ("uncertainty", "disagreement") and reward_models:
        from align.scoring import RewardScorer

        show(f"sampling {k} candidates for each of the pool's {len(pool)} prompts to score them ...")
        texts, kept = _sample_mixed(samplers, pool, sampling, retries)
        samples = {prompt: (texts[i], kept[i]) for i, prompt in enumerate(pool)}
        member_rewards = []
        for ref in reward_models:
            scores = RewardScorer.load(ref).score([p for p in pool for _ in range(k)], [t for ts in texts for t in ts])
            member_rewards.append([scores[i * k:(i + 1) * k] for i in range(len(pool))])
        rewards = [[sum(member[i][j] for member in member_rewards) / len(member_rewards) for j in range(k)]
                   for i in range(len(pool))]
    elif strategy != "random":
        embeddings = embed(pool, encoder)
    chosen = select(strategy, len(pool), budget, seed=sampling.seed, rewards=rewards,
                    member_rewards=member_rewards if len(reward_models) > 1 else None, embeddings=embeddings)
    chosen.indices = [keep[i] for i in chosen.indices]  # back to positions in the caller's pool
    chosen.notes = notes + chosen.notes
    return chosen, samples


def _add_selection_properties(api: Api, dataset: dict) -> None:
    """A dataset created before `--select` existed gets the metadata properties that say why a record was chosen."""
    have = {m["name"] for m in task.read_layout(api, dataset["id"])["metadata"]}
    for item in SELECTION_PROPERTIES:
        if item["name"] not in have:
            api.call("POST", f"/api/v1/datasets/{dataset['id']}/metadata-properties",
                     f"adding '{item['name']}' to dataset '{dataset['name']}'", json_body=item, expect=(201,))


def _check_push_args(k: int, annotators: int | None, sampling, log_every: int, dataset: str) -> None:
    if not 2 <= k <= MAX_K:
        raise AlignError(f"--k {k}: rank between 2 and {MAX_K} completions per prompt (InstructGPT used 4-9)")
    task.check_annotators(annotators)
    if sampling.temperature <= 0:
        raise AlignError(f"--temperature {sampling.temperature:g}: greedy decoding writes the same completion K "
                         "times; sample with a temperature > 0 (e.g. 1.0)")
    if not 1 <= log_every <= 500:
        raise AlignError(f"--log-every {log_every}: between 1 and 500 prompts")
    task.check_dataset_name(dataset)


def _check_existing(api: Api, dataset: dict, name: str, k: int, wanted: dict, annotators: int | None, guidelines: str,
                    guidelines_given: bool) -> list[str]:
    """The dataset exists: its layout and model/sampling must match this push; guidelines (when given) and the
    number of annotators per record are updated when they differ. Returns what was updated."""
    def differences(info: dict) -> list[str]:
        diffs = _differences(_shape(**task.read_layout(api, dataset["id"])), _shape(**layout(k)))
        for key, flag in (("model", "--model"), ("sampling", "sampling flags"), ("mix", "--mix-model, --mix-k")):
            if not diffs and info.get(key) != wanted.get(key):
                diffs.append(f"its completions come from {key} '{info.get(key)}', this push uses "
                             f"'{wanted.get(key)}' ({flag})")
        return diffs

    task.check_existing(api, dataset, name, FORMAT, COMMAND, differences)
    return task.update_settings(api, dataset, name, annotators, guidelines, guidelines_given, "rankings")


def _complete(record: dict | None, k: int) -> bool:
    if record is None:
        return False
    fields, order = record.get("fields") or {}, (record.get("metadata") or {}).get("order")
    return all(isinstance(fields.get(_completion(p)), str) for p in range(k)) and _parse_order(order, k) is not None


def _parse_order(text: Any, k: int) -> list[int] | None:
    try:
        order = [int(x) for x in str(text).split(",")]
    except ValueError:
        return None
    return order if sorted(order) == list(range(k)) else None


def _sampling_params(sampling) -> dict:
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens, "repetition_penalty": sampling.repetition_penalty,
            "seed": sampling.seed}


def _prompt_form(loaded) -> dict:
    """Whether the model reads chat messages (its chat template) or a text prompt, as `generate` feeds it."""
    from align.generation import render_prompts

    seq2seq = bool(getattr(loaded.model.config, "is_encoder_decoder", False))
    conversational = not seq2seq and loaded.template.name == "chat" and bool(loaded.tokenizer.chat_template)

    def model_input(prompt: str) -> str:
        if conversational or seq2seq:
            return prompt
        return render_prompts(loaded.tokenizer, [prompt], loaded.template)[0]

    return {"conversational": conversational, "system": loaded.template.system if conversational else None,
            "model_input": model_input}


def _generate_and_log(api: Api, dataset_id: str, samplers, form: dict, todo: list[str], ids: dict[str, str], k: int,
                      sampling, label: str, log_every: int, retries: int, total: int,
                      presampled: dict[str, tuple[list[str], int]], chosen: dict[str, dict]) -> tuple[int, int]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from align.reporting import console

    logged = duplicates = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        sampled = progress.add_task("sampling completions", total=len(todo) * k)
        logging = progress.add_task("logging records", total=len(todo))
        for start in range(0, len(todo), log_every):
            chunk = todo[start:start + log_every]
            if all(prompt in presampled for prompt in chunk):  # scored by the reward models already: keep those
                samples, repeats = [presampled[p][0] for p in chunk], [presampled[p][1] for p in chunk]
                progress.advance(sampled, len(chunk) * k)
            else:
                samples, repeats = _sample_mixed(samplers, chunk, sampling, retries,
                                                progress=lambda n: progress.advance(sampled, n))
            items = []
            for prompt, texts, kept in zip(chunk, samples, repeats):
                rid = ids[prompt]
                order = shuffled_order(rid, k)
                metadata = {"model": label, "sampling": sampling_text(sampling), "order": ",".join(map(str, order)),
                            "duplicates": kept, **chosen.get(prompt, {})}
                shown = form["model_input"](prompt)
                if shown != prompt:
                    metadata["model_input"] = shown
                fields = {"prompt": prompt, **{_completion(p): texts[order[p]] for p in range(k)}}
                items.append({"external_id": rid, "fields": fields, "metadata": metadata})
                duplicates += kept
            try:
                argilla_api.upsert_records(api, dataset_id, items)
            except server.ServerDown as e:  # every record is whole (all K completions): what is logged is kept
                raise server.ServerDown(e.url, f"the Argilla server at {e.url} stopped responding during push after "
                                        f"{total - len(todo) + logged} of {total} prompts were logged; nothing lost; "
                                        f"{server.restart_hint(e.url)} and re-run the same command to continue",
                                        e.cause) from None
            except AlignError as e:
                raise AlignError(f"{e}. {total - len(todo) + logged} of {total} prompts are in the dataset; run the "
                                 "same push again to add the rest (it skips what is there)") from None
            logged += len(items)
            progress.advance(logging, len(items))
    return logged, duplicates


def push_command(**kwargs) -> PushResult:
    """`align label push`: push, then say what happened and what comes next."""
    result = push(**kwargs)
    show(f"[bold green]dataset '{esc(result.dataset)}'[/bold green]: {result.prompts} prompts, "
         f"{result.created} records written, {result.skipped} already there")
    for note in result.notes:
        show(f"  {esc(note)}")
    if result.repeated_prompts:
        show(f"  {result.repeated_prompts} repeated prompts in the file were pushed once")
    if result.selection is not None:
        chosen = result.selection
        show(f"  {len(chosen.indices)} prompts of the pool chosen by [bold]{chosen.strategy}[/bold] (metadata "
             "'selection', 'selection_score', 'selection_rank')")
    if result.duplicates_kept:
        show(f"  [yellow]{result.duplicates_kept} completions are identical to another one of the same prompt[/yellow]"
             " even after re-sampling (metadata 'duplicates'); a higher --temperature gives more variety")
    show(f"  annotators rank at {esc(result.url)}")
    show("  add annotators: [bold]align label users add NAME[/bold]; progress: [bold]align label status "
         f"--dataset {esc(result.dataset)}[/bold]; then [bold]align label pull[/bold]")
    return result


# --- Status --------------------------------------------------------------------------------------------------

def status(dataset: str, workspace: str = WORKSPACE) -> dict:
    """Progress overall and per annotator: ``{"total", "completed", "pending", "users": {name: {...}}}``."""
    api = Api.connect()
    found = _require_dataset(api, dataset, workspace)
    progress = task.progress(api, found)
    users = api.call("GET", f"/api/v1/datasets/{found['id']}/users/progress", "reading annotator progress")["users"]
    per_user = {}
    for user in users:
        totals = Counter()
        for part in ("completed", "pending"):
            totals.update({key: value for key, value in (user.get(part) or {}).items() if isinstance(value, int)})
        per_user[user["username"]] = {"submitted": totals["submitted"], "draft": totals["draft"],
                                      "discarded": totals["discarded"]}
    chosen_by = Counter((r.get("metadata") or {}).get("selection") or "all of the file"
                        for r in argilla_api.records(api, found["id"], responses=False))
    api.close()
    info = found["metadata"][METADATA_KEY]
    return {**progress, "users": per_user, "model": info.get("model"), "k": info.get("k"),
            "selection": dict(chosen_by)}


def status_command(dataset: str, workspace: str = WORKSPACE) -> dict:
    from align.reporting import print_table

    current = status(dataset, workspace)
    print_table(f"dataset '{dataset}'", [
        ("records", current["total"]), ("completed", current["completed"]), ("pending", current["pending"]),
        ("rankings wanted per record", current["min_submitted"]), ("completions per prompt", current["k"]),
        ("model", current["model"]),
        ("records chosen by", ", ".join(f"{how}: {n}" for how, n in sorted(current["selection"].items()))),
    ])
    show(f"annotators rank at {esc(current['url'])}")
    task.print_annotators(current["users"], ("submitted", "draft", "discarded"), "no annotator has answered yet")
    return current


# --- Pull ------------------------------------------------------------------------------------------------------

@dataclass
class PullResult:
    out: Path
    rows: list[dict]
    metrics: dict[str, Any]
    gold: str | None = None  # the gold preference(s) simulated annotators ranked by
    artifact: Any = None
    notes: list[str] = field(default_factory=list)


class _Ranking(NamedTuple):
    """One annotator's submitted ranking of one record, over the original sample indices."""

    record: dict
    texts: list[str]  # completion text per original sample index
    annotator: str  # annotator_id(...)
    simulated: bool
    ranks: dict[int, int]
    values: dict  # the response's values (quality, flags, comment)
    gold: str | None  # the gold preference a simulated annotator ranked by


def pull(dataset: str, out: str, ties: str = "skip", aggregate: str = "each", workspace: str = WORKSPACE,
         register: bool = True) -> PullResult:
    """Submitted rankings -> preference pairs in TRL's format, written atomically to ``out`` and registered."""
    if ties not in TIES:
        raise AlignError(f"--ties {ties}: choose one of {', '.join(TIES)}")
    task.check_pull(aggregate, AGGREGATES, register)
    api = Api.connect()
    try:  # everything is read before anything is written
        found = _require_dataset(api, dataset, workspace)
        records = argilla_api.records(api, found["id"], responses=True)
        usernames = argilla_api.usernames(api)
    except server.ServerDown as e:
        raise server.ServerDown(e.url, f"the Argilla server at {e.url} stopped responding during pull {e.cause}; "
                                "nothing was written or registered; "
                                f"{server.restart_hint(e.url)} and re-run the same command", e.cause) from None
    info = found["metadata"][METADATA_KEY]
    k = int(info["k"])
    golds = argilla_api.simulated_golds(api.url, found["id"])  # simulated annotator name -> the gold they used
    api.close()

    counts = Counter()
    rankings: list[_Ranking] = []
    for record in records:
        order = _parse_order((record.get("metadata") or {}).get("order"), k)
        if order is None:
            counts["records_without_order"] += 1
            continue
        texts = [""] * k
        for position, sample in enumerate(order):
            texts[sample] = (record.get("fields") or {}).get(_completion(position), "")
        for response, values in task.submitted_responses(record, counts):
            ranks = _ranks((values.get("ranking") or {}).get("value"), order, k)
            if ranks is None:
                counts["unusable"] += 1
                continue
            username = usernames.get(str(response.get("user_id")), "")
            rankings.append(_Ranking(record, texts, annotator_id(response.get("user_id")),
                                     username.startswith(SIM_PREFIX), ranks, values,
                                     golds.get(username) if username.startswith(SIM_PREFIX) else None))
    if not rankings:
        raise task.nothing_submitted("rankings", dataset, records, counts,
                                     f"annotators rank at {annotation_url(api.url, found['id'])}")

    conversational, system = bool(info.get("conversational")), info.get("system")
    by_record: dict[str, dict[str, dict[int, int]]] = {}
    for ranking in rankings:
        by_record.setdefault(ranking.record["external_id"], {})[ranking.annotator] = ranking.ranks

    rows: list[dict] = []
    if aggregate == "each":
        tied_pairs = sum(pair.tie for r in rankings for pair in ranking_to_pairs(r.ranks, "keep"))  # kept or not
        for record, texts, annotator, simulated, ranks, values, gold in rankings:
            prompt = _prompt_value(record, conversational, system)
            for pair in ranking_to_pairs(ranks, ties):
                if not texts[pair.winner].strip() or not texts[pair.loser].strip():
                    counts["empty_pairs"] += 1  # an empty completion teaches nothing a reward model can use
                    continue
                row = {"prompt": prompt, **_chosen_rejected(texts[pair.winner], texts[pair.loser], conversational),
                       "record_id": record["external_id"], "annotator": annotator, "simulated": simulated,
                       "chosen_rank": ranks[pair.winner], "rejected_rank": ranks[pair.loser],
                       "chosen_index": pair.winner, "rejected_index": pair.loser}
                if gold:
                    row["gold"] = gold
                if ties == "keep":
                    row["tie"] = pair.tie
                quality, flags = (values.get("quality") or {}).get("value"), (values.get("flags") or {}).get("value")
                if quality is not None:
                    row["best_quality"] = quality
                if flags:
                    row["flags"] = flags
                comment = (values.get("comment") or {}).get("value")
                if comment:
                    row["comment"] = comment
                rows.append(row)
    else:
        tied_pairs = 0  # pairs without a majority
        grouped: dict[str, list[_Ranking]] = {}
        for ranking in rankings:
            grouped.setdefault(ranking.record["external_id"], []).append(ranking)
        for rid, entries in grouped.items():
            record, texts = entries[0].record, entries[0].texts
            prompt = _prompt_value(record, conversational, system)
            tied_pairs += sum(vote.tie for vote in majority([e.ranks for e in entries], "keep"))
            for vote in majority([e.ranks for e in entries], ties):
                if not texts[vote.winner].strip() or not texts[vote.loser].strip():
                    counts["empty_pairs"] += 1
                    continue
                row = {"prompt": prompt, **_chosen_rejected(texts[vote.winner], texts[vote.loser], conversational),
                       "record_id": rid, "annotators": sorted(e.annotator for e in entries),
                       "simulated": all(e.simulated for e in entries),
                       **({"gold": "+".join(sorted({e.gold for e in entries if e.gold}))}
                          if any(e.gold for e in entries) else {}),
                       "votes": {"chosen": vote.wins, "rejected": vote.losses, "tie": vote.ties},
                       "chosen_index": vote.winner, "rejected_index": vote.loser}
                if ties == "keep":
                    row["tie"] = vote.tie
                rows.append(row)

    stats = pairwise_agreement(by_record)
    metrics = {
        "records": len(records), "ranked_records": len(by_record), "rankings": len(rankings),
        "annotators": len({r.annotator for r in rankings}), "simulated_rankings": sum(r.simulated for r in rankings),
        "pairs": len(rows), "ties": tied_pairs, "multi_annotator_records": stats.records,
        "agreement": stats.agreement, "kendall_tau": stats.mean_tau,
        "drafts_ignored": counts["draft"], "discarded_ignored": counts["discarded"],
    }
    for key in ("unusable", "records_without_order", "empty_pairs"):  # not made by push, or partial rankings: left out
        if counts[key]:
            metrics[key] = counts[key]
    target = Path(out)
    result = PullResult(out=target, rows=rows, metrics=metrics,
                        gold=", ".join(sorted({r.gold for r in rankings if r.gold})) or None)
    if not register:
        write_jsonl(target, rows)
        return result
    result.artifact, note = task.write_registered(target, rows, lambda staging: _register(
        dataset, target, staging, rows, metrics, info, found, ties, aggregate, api.url, result.gold))
    if note:
        result.notes.append(note)
    return result


def _ranks(value: Any, order: list[int], k: int) -> dict[int, int] | None:
    """A response's ranking (positions ``completion_N``) as ``{original sample index: rank}``; None if partial."""
    if not isinstance(value, list):
        return None
    ranks = {}
    for item in value:
        match = re.fullmatch(r"completion_(\d+)", str((item or {}).get("value", "")))
        rank = (item or {}).get("rank")
        if not match or not isinstance(rank, int) or rank < 1 or not 1 <= int(match.group(1)) <= k:
            return None
        ranks[order[int(match.group(1)) - 1]] = rank
    return ranks if len(ranks) == k else None


def _prompt_value(record: dict, conversational: bool, system: str | None) -> Any:
    prompt = record["fields"]["prompt"]
    if conversational:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return (record.get("metadata") or {}).get("model_input") or prompt


def _chosen_rejected(chosen: str, rejected: str, conversational: bool) -> dict:
    if conversational:
        return {"chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"chosen": chosen, "rejected": rejected}


def _register(dataset: str, target: Path, staging: Path, rows: list[dict], metrics: dict, info: dict, found: dict,
              ties: str, aggregate: str, api_url: str, gold: str | None):
    from align.data import fingerprint
    from align.registry import looks_like_ref

    registry = Registry()

    def parent(label: str) -> tuple[Artifact | None, str | None]:
        """The registry artifact of the model that wrote completions, or why there is none."""
        if looks_like_ref(label):
            try:
                return registry.resolve(label), None
            except AlignError:
                return None, f"model {label} is no longer in the registry: no parent recorded"
        found = next((a for a in registry.list() if a.kind == "model" and a.path == label), None)
        return found, None if found else f"model {label} is not a registry artifact: no parent recorded"

    label = str(info.get("model") or "")
    mix = info.get("mix") or {}
    writers = [parent(label)] + ([parent(str(mix.get("model")))] if mix else [])
    note = "; ".join(why for _, why in writers if why) or None
    artifact = registry.add(
        stage="label", name=dataset, kind="dataset", path=target, staged=staging,
        parents=[model.id for model, _ in writers if model],
        data_fingerprint=fingerprint(rows), metrics=metrics,
        config={"dataset": dataset, "dataset_id": found["id"], "api_url": api_url, "ties": ties,
                "aggregate": aggregate, "k": info.get("k"), "model": label, **({"mix": mix} if mix else {}),
                "sampling": info.get("sampling"),
                "conversational": bool(info.get("conversational")),
                **({"simulated_gold": gold} if gold else {})},
    )
    return artifact, note


def pull_command(dataset: str, out: str, ties: str = "skip", aggregate: str = "each",
                 workspace: str = WORKSPACE) -> PullResult:
    from align.reporting import print_table

    result = pull(dataset, out, ties, aggregate, workspace)
    m = result.metrics
    print_table(f"preference pairs from '{dataset}'", [
        ("records", m["records"]), ("ranked records", m["ranked_records"]),
        ("submitted rankings", m["rankings"]), ("annotators", m["annotators"]),
        ("pairs written", m["pairs"]), (f"tied pairs ({'kept' if ties == 'keep' else 'skipped'})", m["ties"]),
        ("records with >= 2 annotators", m["multi_annotator_records"]),
        ("pairwise agreement", "n/a (needs >= 2 annotators per record)" if m["agreement"] is None else m["agreement"]),
        ("mean Kendall tau-b", "n/a" if m["kendall_tau"] is None else m["kendall_tau"]),
        ("drafts / discarded (ignored)", f"{m['drafts_ignored']} / {m['discarded_ignored']}"),
    ])
    if m["simulated_rankings"]:
        by = f" ranking by the gold {result.gold}" if result.gold else ""
        show(f"[yellow]{m['simulated_rankings']} rankings come from simulated annotators{esc(by)} (marked "
             "\"simulated\": true): demo data, not human preferences[/yellow]")
    if m.get("unusable") or m.get("records_without_order"):
        show(f"[yellow]left out: {m.get('unusable', 0)} partial rankings, {m.get('records_without_order', 0)} "
             "records without align's 'order' metadata[/yellow]")
    task.show_written(result, "pairs")
    return result


# --- Simulate -------------------------------------------------------------------------------------------------

def add_noise(ranks: list[int], noise: float, rng: random.Random) -> list[int]:
    """Walk the ranking best to worst and swap each adjacent pair with probability ``noise`` (ranks move with the
    positions, so a tie stays a tie)."""
    if noise <= 0:
        return list(ranks)
    order = sorted(range(len(ranks)), key=lambda p: (ranks[p], p))
    slots = [ranks[p] for p in order]
    for i in range(len(order) - 1):
        if rng.random() < noise:
            order[i], order[i + 1] = order[i + 1], order[i]
    noisy = [0] * len(ranks)
    for slot, position in zip(slots, order):
        noisy[position] = slot
    return noisy


def simulate(dataset: str, annotators: int, gold: str, noise: float = 0.0, seed: int = 0,
             workspace: str = WORKSPACE, tie_margin: float = 0.0) -> dict[str, int]:
    """For demos and tests: ``sim-annotator-1..N`` rank every record still in their queue by a gold preference
    (align/gold.py; or ``random``: no preference at all), through the REST calls the web UI makes. Which gold each
    simulated annotator used is remembered, so that `pull` and the registry can say. Completions whose gold scores
    are within `tie_margin` share a rank, as people rank near-equal responses as ties. Returns the rankings each
    submitted now."""
    task.check_simulate_args(annotators, noise)
    if not tie_margin >= 0:
        raise AlignError(f"--tie-margin {tie_margin}: 0 or more (gold scores this close rank as a tie)")
    scorer = None if gold == "random" else load_gold(gold, option="--gold")
    api = Api.connect()
    found = _require_dataset(api, dataset, workspace)
    users = task.enroll_simulated(api, found, annotators, workspace)
    earlier = argilla_api.simulated_golds(api.url, found["id"])
    for name in users:
        if earlier.get(name, gold) != gold:
            raise AlignError(f"--gold {gold}: {name} already ranked dataset '{dataset}' by the gold {earlier[name]}; "
                             f"one dataset holds the rankings of one gold per annotator: push the completions to a "
                             f"new dataset to rank them by {gold}")
    submitted = {}
    for name, annotator_api in task.annotator_apis(api, users):
        argilla_api.remember_simulated_gold(api.url, found["id"], name, gold)
        submitted[name] = _annotate(annotator_api, found["id"], name, scorer, noise, seed, tie_margin)
    api.close()
    return submitted


def _annotate(api: Api, dataset_id: str, name: str, gold: Gold | None, noise: float, seed: int,
              tie_margin: float) -> int:
    submitted = 0
    for records in task.pending_queue(api, dataset_id, name):
        scored = [_positions(record) for record in records]
        scores = gold.score([record["fields"]["prompt"] for record, positions in zip(records, scored)
                             for _ in positions],
                            [record["fields"][key] for record, positions in zip(records, scored)
                             for key in positions]) if gold is not None else []
        for record, positions in zip(records, scored):
            tag = f"{seed}:{name}:{record.get('external_id') or record['id']}"
            if gold is None:
                ranks = list(range(1, len(positions) + 1))
                random.Random(f"rule:{tag}").shuffle(ranks)
            else:
                ranks, scores = rank(scores[:len(positions)], tie_margin), scores[len(positions):]
            ranks = add_noise(ranks, noise, random.Random(f"noise:{tag}"))
            quality = random.Random(f"quality:{tag}").randint(3, 7)
            task.submit(api, record, f"{name} submitting a ranking", {
                "ranking": {"value": [{"value": key, "rank": r} for key, r in zip(positions, ranks)]},
                "quality": {"value": quality}})
            submitted += 1
    return submitted


def _positions(record: dict) -> list[str]:
    """The record's completion fields in display order."""
    return sorted((key for key in record["fields"] if re.fullmatch(r"completion_\d+", key)),
                  key=lambda key: int(key.split("_")[1]))


def simulate_command(dataset: str, annotators: int, gold: str, noise: float = 0.0, seed: int = 0,
                     workspace: str = WORKSPACE, tie_margin: float = 0.0) -> dict[str, int]:
    from align.reporting import print_table

    submitted = simulate(dataset, annotators, gold, noise, seed, workspace, tie_margin)
    show("[yellow]simulated annotators are for demos and tests only: `align label pull` marks their pairs "
         "\"simulated\": true and records their gold[/yellow]")
    print_table(f"rankings submitted now (gold {gold}, ties within {tie_margin:g}, noise {noise:g})",
                [(name, count) for name, count in submitted.items()])
    show(f"their passwords (to look in the UI): {esc(simulated_users_file())}")
    return submitted
