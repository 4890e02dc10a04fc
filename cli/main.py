"""The `align` command: one way in for every stage.

`align <stage> --config file.yaml [dotted.key=value ...]`. Problems the user can fix end as one line
`error: ...` with exit code 2 (a traceback only with `--debug`).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from align import __version__
from align.errors import AlignError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `align eval compare A B --config x.yaml key=value`: models and overrides may come on both sides of --config.
    if extra and getattr(args, "handler", None) is _run_eval_compare and not any(e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):  # `align` alone (or only --debug): a usage error like any other
        parser.error("a command is required")
    _quiet_libraries()
    try:
        args.handler(args)
    except AlignError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A full disk surfaces from any writer (safetensors, torch.save, json, SQLite) in its own words: one line,
        # and the unusable partial output goes, freeing the space; complete checkpoints stay for --resume.
        if args.debug or not _out_of_space(e):
            raise
        from align.artifacts import discard_unfinished_outputs

        kept = discard_unfinished_outputs()
        print(f"error: out of disk space while writing{_written_file(e)}: {_first_line(e)}; free some space and run "
              f"the command again" + (f" with --resume (the last checkpoint is kept in {kept[0]})" if kept else ""),
              file=sys.stderr)
        return 2
    return 0


def _out_of_space(error: BaseException) -> bool:
    """True when `error`, or an error it came from, says the disk (or the file size limit) is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(marker in str(error) for marker in ("No space left", "StorageFull", "disk is full", "File too large",
                                                   "Disk quota exceeded", "file write failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _written_file(error: BaseException) -> str:
    filename = getattr(error, "filename", None)
    return f" {filename}" if filename else ""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one `error:` line, exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _sampling(name: str):
    """argparse type of the option for SamplingConfig's `name`: checked by the rule SamplingConfig itself applies, so a
    bad value is a usage error naming the option, before any model loads. Imported when an option is given: building
    the parser stays free of torch."""

    def parse(text: str):
        from align.generation import SAMPLING_RULES, sampling_problem

        whole = SAMPLING_RULES[name][0]
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            expected = "a whole number" if whole else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        problem = sampling_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _training_command(commands, name: str, summary: str, example_config: str, example_override: str, handler):
    """A training stage's command: --config, key=value overrides, --resume, --debug."""
    command = commands.add_parser(name, help=summary)
    command.add_argument("--config", required=True, help=f"YAML config (see {example_config})")
    command.add_argument("overrides", nargs="*", metavar="key=value",
                         help=f"override config values, e.g. {example_override}")
    command.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    command.set_defaults(handler=handler)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="align", description="InstructGPT-style alignment: SFT, reward model, "
                                                               "PPO/DPO, with a model registry.")
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    _training_command(commands, "sft", "supervised fine-tuning (stage 1)", "configs/", "lora.r=8", _run_sft)

    # --- reward model: train (stages/reward.py) and score (align/scoring.py) ---
    _training_command(commands, "reward", "reward model from human preference pairs (stage 2)", "configs/reward.yaml",
                      "lora.r=8", _run_reward)
    score = commands.add_parser("score", help="score (prompt, response) records with a reward model")
    score.add_argument("--model", required=True, help="reward model: folder or registry ref (reward:latest, reward:2)")
    score.add_argument("--data", required=True, help=".jsonl/.json/.csv/.parquet records with a prompt and a response "
                                                     "(or completion / chosen) field; texts or message lists")
    score.add_argument("--out", help="write the records with a 'reward' field to this .jsonl (default: "
                                     "<data name>.scores.jsonl in the current folder)")
    score.add_argument("--raw", action="store_true", help="raw rewards (default: normalized, reference mean 0)")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    score.set_defaults(handler=_run_score)
    # --- end reward model ---

    # --- policy optimization: PPO (stages/ppo/) and DPO (stages/dpo.py) ---
    ppo = _training_command(commands, "ppo", "PPO against a reward model, KL-penalized to the SFT model (stage 3)",
                            "configs/ppo.yaml", "ppo.steps=50", _run_ppo)
    ppo.add_argument("--algorithm", choices=["ppo", "grpo", "rloo"],
                     help="ppo (default): InstructGPT PPO; grpo / rloo: TRL's group-relative trainers (the config's "
                          "`algorithm`)")
    _training_command(commands, "dpo", "DPO on preference pairs, reference = the SFT model (stage 3)",
                      "configs/dpo.yaml", "training.beta=0.2", _run_dpo)
    # --- end policy optimization ---

    # --- evaluation (stages/eval.py; human A/B: labeling/pairwise.py) ---
    evaluation = commands.add_parser("eval", help="compare models: helpfulness (win rates) and alignment tax")
    eval_commands = evaluation.add_subparsers(title="eval commands", metavar="COMMAND", required=True,
                                              parser_class=_Parser)
    compare = eval_commands.add_parser("compare", help="every model vs the baseline; writes a report")
    compare.add_argument("--config", required=True, help="YAML config (see configs/eval.yaml)")
    compare.add_argument("items", nargs="*", metavar="MODEL|key=value",
                         help="models to compare (replace the config's `models:`) and config overrides")
    compare.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    compare.set_defaults(handler=_run_eval_compare)
    reward_eval = eval_commands.add_parser("reward", help="how good is a reward model: accuracy on preference pairs, "
                                                          "length bias, calibration (95%% CIs)")
    reward_eval.add_argument("--model", required=True, help="reward model: folder or registry ref (reward:latest, "
                                                            "reward:2)")
    reward_eval.add_argument("--data", required=True, nargs="+", metavar="FILE",
                             help="preference pairs: files in any format `align reward` reads (TRL {prompt, chosen, "
                                  "rejected}, messages, implicit prompt, rankings, `align label pull` pairs, "
                                  "RewardBench with `subset`) or registry refs (label:3)")
    reward_eval.add_argument("--out", help="output folder (default runs/eval/reward-<model>)")
    reward_eval.add_argument("--batch-size", type=int, default=16, help="responses scored per forward pass")
    reward_eval.add_argument("--tie-margin", type=float, default=0.0,
                             help="scores this close count as a tie, half right (default 0: exact equality)")
    reward_eval.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    reward_eval.set_defaults(handler=_run_eval_reward)
    human = eval_commands.add_parser("human", help="blind A/B comparisons by people in Argilla")
    human_commands = human.add_subparsers(title="human eval commands", metavar="COMMAND", required=True,
                                          parser_class=_Parser)
    human_push = human_commands.add_parser("push", help="log blind A/B pairs (model vs baseline) for annotators")
    human_push.add_argument("--generations", required=True,
                            help="an evaluation (eval:latest, eval:2) or a generations .jsonl of {model, prompt, "
                                 "response} rows, as `align eval compare` writes")
    human_push.add_argument("--model", required=True, help="the model judged (as named in the generations)")
    human_push.add_argument("--baseline", required=True, help="the model it is compared with")
    human_push.add_argument("--annotators-per-record", type=int, help="judgments wanted per pair (default 1)")
    human_push.add_argument("--guidelines", help="markdown file shown to annotators (default: align's)")
    human_status = human_commands.add_parser("status", help="judging progress, overall and per annotator")
    human_pull = human_commands.add_parser("pull", help="submitted choices -> human win rate with 95% CIs, "
                                                        "registered")
    human_pull.add_argument("--out", required=True, help=".jsonl file for the judgments (written atomically)")
    human_pull.add_argument("--aggregate", choices=("majority", "each"), default="majority",
                            help="one majority judgment per pair (default) or every annotator's")
    human_simulate = human_commands.add_parser("simulate", help="DEMOS/TESTS ONLY: sim-annotator-N choose by a rule")
    human_simulate.add_argument("--annotators", type=int, required=True, help="number of simulated annotators")
    human_simulate.add_argument("--rule", required=True, choices=("longer", "shorter", "random", "model", "baseline"))
    human_simulate.add_argument("--noise", type=float, default=0.0, help="probability of flipping a choice")
    human_simulate.add_argument("--seed", type=int, default=0)
    for sub in (human_push, human_status, human_pull, human_simulate):
        sub.add_argument("--dataset", required=True, help="Argilla dataset name")
        sub.add_argument("--workspace", default="align")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    human_push.set_defaults(handler=_human_push)
    human_status.set_defaults(handler=_human_status)
    human_pull.set_defaults(handler=_human_pull)
    human_simulate.set_defaults(handler=_human_simulate)
    # --- end evaluation ---

    pipeline = commands.add_parser("pipeline", help="the whole chain: sft -> rankings -> reward -> ppo/dpo -> eval")
    pipeline.add_argument("--config", required=True, help="YAML config (see configs/pipeline-demo.yaml)")
    pipeline.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. "
                                                                             "label.annotators=human")
    pipeline.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    pipeline.set_defaults(handler=_run_pipeline)

    gen = commands.add_parser("generate", help="batched generation from a model or registry reference")
    gen.add_argument("--model", required=True, help="folder, hub id, or registry ref (sft:latest, sft:2, a name)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts", help="file: .txt (one per line) or .jsonl/.json/.csv with a prompt field")
    gen.add_argument("--max-new-tokens", type=_sampling("max_new_tokens"), default=128)
    gen.add_argument("--temperature", type=_sampling("temperature"), default=0.7, help="0 for greedy decoding")
    gen.add_argument("--top-p", type=_sampling("top_p"), default=0.95)
    gen.add_argument("--top-k", type=_sampling("top_k"), default=0)
    gen.add_argument("--repetition-penalty", type=_sampling("repetition_penalty"), default=1.0)
    gen.add_argument("--seed", type=_sampling("seed"), default=0)
    gen.add_argument("--batch-size", type=_sampling("batch_size"), default=16)
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed prompts as raw text (default: the template the model was trained with)")
    gen.add_argument("--out", help="write {prompt, completion} lines to this .jsonl file")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    gen.set_defaults(handler=_run_generate)

    label = commands.add_parser("label", help="human rankings in Argilla: server, users, push, pull")
    label_commands = label.add_subparsers(title="label commands", metavar="COMMAND", required=True,
                                          parser_class=_Parser)
    serve = label_commands.add_parser("serve", help="run the embedded Argilla server + web UI on 127.0.0.1")
    serve.add_argument("action", nargs="?", choices=("start", "stop", "status"), default="start",
                       help="start (default; does nothing if it already runs), stop, or status")
    serve.add_argument("--port", type=int, help="port for a new server (default 6900)")
    serve.set_defaults(handler=_label_serve)
    users = label_commands.add_parser("users", help="annotator and admin logins")
    users_commands = users.add_subparsers(title="users commands", metavar="COMMAND", required=True,
                                          parser_class=_Parser)
    add_user = users_commands.add_parser("add", help="create a login; prints its password once")
    add_user.add_argument("name", help="user name: lowercase letters, digits, '-', '_'")
    add_user.add_argument("--role", choices=("annotator", "admin"), default="annotator")
    add_user.set_defaults(handler=_label_add_user)
    for sub in (serve, add_user):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    # --- label: rankings (push / status / pull / simulate; labeling/rankings.py) ---
    push = label_commands.add_parser("push", help="sample K completions per prompt and log them for ranking")
    push.add_argument("--model", required=True, help="folder, hub id, or registry ref (sft:latest, sft:2, a name)")
    push.add_argument("--prompts", required=True, help="file: .txt (one per line) or .jsonl/.json/.csv with a "
                                                       "prompt/question/instruction field")
    push.add_argument("--dataset", required=True, help="Argilla dataset name (pushing again continues it)")
    push.add_argument("--k", type=int, default=4, help="completions per prompt to rank (default 4)")
    push.add_argument("--annotators-per-record", type=int,
                      help="rankings wanted per prompt before it leaves everyone's queue (default 1; given again, "
                           "it updates the dataset)")
    push.add_argument("--workspace", default="align")
    push.add_argument("--guidelines", help="markdown file shown to annotators (default: align's InstructGPT-style)")
    push.add_argument("--max-new-tokens", type=_sampling("max_new_tokens"), default=128)
    push.add_argument("--temperature", type=_sampling("temperature"), default=1.0)
    push.add_argument("--top-p", type=_sampling("top_p"), default=0.95)
    push.add_argument("--top-k", type=_sampling("top_k"), default=0)
    push.add_argument("--seed", type=_sampling("seed"), default=0)
    push.add_argument("--batch-size", type=_sampling("batch_size"), default=16, help="generations per forward pass")
    push.add_argument("--select", choices=("random", "uncertainty", "disagreement", "diversity"),
                      help="treat --prompts as a pool and push only --budget of them, chosen at random, by the reward "
                           "model's uncertainty, by the disagreement of several reward models, or for diversity")
    push.add_argument("--budget", type=int, help="with --select: how many prompts of the pool go to annotators")
    push.add_argument("--reward-model", action="append", default=[], dest="reward_models",
                      help="with --select uncertainty|disagreement: the reward model scoring the candidates "
                           "(repeat it for an ensemble); without one, selection falls back to diversity")
    push.add_argument("--mix-model", help="a second model (e.g. the SFT model beside a policy) that writes --mix-k "
                                          "of the K completions of each prompt")
    push.add_argument("--mix-k", type=int, default=0, help="with --mix-model: how many of the K it writes")
    push.add_argument("--log-every", type=int, default=32,
                      help="prompts generated and logged at a time (a crash loses at most these)")
    push.set_defaults(handler=_label_push)
    label_status = label_commands.add_parser("status", help="ranking progress, overall and per annotator")
    pull = label_commands.add_parser("pull", help="submitted rankings -> preference pairs (TRL format), registered")
    pull.add_argument("--out", required=True, help=".jsonl file for the pairs (written atomically)")
    pull.add_argument("--ties", choices=("skip", "keep"), default="skip",
                      help="tied completions: leave out (default) or keep with \"tie\": true")
    pull.add_argument("--aggregate", choices=("each", "majority"), default="each",
                      help="pairs from every annotator (default) or one majority vote per pair")
    simulate = label_commands.add_parser("simulate", help="DEMOS/TESTS ONLY: sim-annotator-N users rank by a gold "
                                                          "preference")
    simulate.add_argument("--annotators", type=int, required=True, help="number of simulated annotators")
    simulate.add_argument("--gold", "--rule", dest="gold", required=True,
                          help="what they rank by: a built-in rule (sentiment, shorter, longer, keyword:WORD), a "
                               "Python callable module:function(prompt, response) -> number, a reward model "
                               "(reward:N or a folder), or random (no preference)")
    simulate.add_argument("--noise", type=float, default=0.0, help="probability of swapping adjacent ranks")
    simulate.add_argument("--tie-margin", type=float, default=0.0,
                          help="completions whose gold scores are this close rank as a tie (default 0)")
    simulate.add_argument("--seed", type=int, default=0)
    for sub in (label_status, pull, simulate):
        sub.add_argument("--dataset", required=True, help="Argilla dataset name")
        sub.add_argument("--workspace", default="align")
    label_status.set_defaults(handler=_label_status)
    pull.set_defaults(handler=_label_pull)
    simulate.set_defaults(handler=_label_simulate)
    for sub in (push, label_status, pull, simulate):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    # --- end label: rankings ---

    registry = commands.add_parser("registry", help="list and inspect registered artifacts")
    registry_commands = registry.add_subparsers(title="registry commands", metavar="COMMAND", required=True,
                                                parser_class=_Parser)
    listing = registry_commands.add_parser("list", help="all artifacts, newest first")
    listing.add_argument("--stage", help="only this stage")
    listing.set_defaults(handler=_registry_list)
    show = registry_commands.add_parser("show", help="one artifact in full")
    show.add_argument("ref")
    show.set_defaults(handler=_registry_show)
    lineage = registry_commands.add_parser("lineage", help="an artifact and everything it was built from")
    lineage.add_argument("ref")
    lineage.set_defaults(handler=_registry_lineage)
    for sub in (listing, show, lineage):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for what matters: progress, warnings that need action, our summaries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # "Loading weights" bars would land between a stage's table and its one-line errors; stages show their own.
    # Set through the environment (read when transformers imports), so commands that never load a model don't pay
    # for importing transformers here; directly when it is imported already (align called from Python).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Deprecation notices about arguments align passes on the user's behalf are not theirs to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)\b")
    warnings.filterwarnings("ignore", message=".*pin_memory.*no accelerator is found")


# Stage handlers read the config once, with align's own checks (TRL's `training:` fields read from its source): a
# mistake in it is reported in a second, not after torch, transformers and TRL have imported. The stage's `check`
# then finishes the same object (TRL's own config object built, errors at the same file:line), still before any
# model or data loads, and its `run` takes it.

def _run_sft(args) -> None:
    from align.config import read_config
    from align.stages.sft_config import SFTRunConfig

    loaded = read_config(args.config, args.overrides, SFTRunConfig)
    from align.stages import sft

    sft.run(sft.check(loaded), args.config, resume=args.resume)


# --- reward model handlers ---

def _run_reward(args) -> None:
    from align.config import read_config
    from align.stages.reward_config import RewardRunConfig

    loaded = read_config(args.config, args.overrides, RewardRunConfig)
    from align.stages import reward

    reward.run(reward.check(loaded), args.config, resume=args.resume)


def _run_score(args) -> None:
    from align.scoring import score_command

    score_command(args.model, args.data, out=args.out, raw=args.raw, batch_size=args.batch_size)

# --- end reward model handlers ---


def _run_ppo(args) -> None:
    from align.config import read_config
    from align.stages.ppo.config import PPORunConfig

    overrides = args.overrides + ([f"algorithm={args.algorithm}"] if args.algorithm else [])
    loaded = read_config(args.config, overrides, PPORunConfig)
    if loaded.config.algorithm == "ppo":
        from align.stages.ppo import stage
    else:  # grpo, rloo: TRL's trainers
        from align.stages.ppo import grpo as stage
    stage.run(stage.check(loaded), args.config, resume=args.resume)


def _human_push(args) -> None:
    from align.labeling import pairwise

    pairwise.push_command(args.generations, args.model, args.baseline, args.dataset, workspace=args.workspace,
                          annotators_per_record=args.annotators_per_record, guidelines_file=args.guidelines)


def _human_status(args) -> None:
    from align.labeling import pairwise

    pairwise.status_command(args.dataset, args.workspace)


def _human_pull(args) -> None:
    from align.labeling import pairwise

    pairwise.pull_command(args.dataset, args.out, aggregate=args.aggregate, workspace=args.workspace)


def _human_simulate(args) -> None:
    from align.labeling import pairwise

    pairwise.simulate_command(args.dataset, args.annotators, args.rule, noise=args.noise, seed=args.seed,
                              workspace=args.workspace)


def _run_pipeline(args) -> None:
    from align.cli import pipeline

    pipeline.run(pipeline.load(args.config, args.overrides), args.config)


def _run_eval_compare(args) -> None:
    from align.config import load_config
    from align.stages.eval_config import EvalRunConfig

    overrides = [item for item in args.items if "=" in item]
    models = [item for item in args.items if "=" not in item]
    if models:  # they replace the config's `models:`
        overrides.append(f"models={json.dumps(models)}")
    cfg = load_config(args.config, overrides, EvalRunConfig)
    from align.stages import eval as evaluation

    evaluation.run(cfg)


def _run_eval_reward(args) -> None:
    from align.stages import eval_reward

    eval_reward.run(args.model, args.data, out=args.out, batch_size=args.batch_size, tie_margin=args.tie_margin)


def _run_dpo(args) -> None:
    from align.config import read_config
    from align.stages.dpo_config import DPORunConfig

    loaded = read_config(args.config, args.overrides, DPORunConfig)
    from align.stages import dpo

    dpo.run(dpo.check(loaded), args.config, resume=args.resume)


def _run_generate(args) -> None:
    from align.config import TemplateConfig
    from align.data import read_prompts
    from align.generation import SamplingConfig, generate
    from align.modeling import load_for_inference
    from align.reporting import console

    prompts = args.prompt or read_prompts(args.prompts)
    loaded = load_for_inference(args.model, option="--model")
    template = TemplateConfig(name="plain") if args.no_chat_template else loaded.template
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              batch_size=args.batch_size)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("generate", total=len(prompts))
        completions = generate(loaded.model, loaded.tokenizer, prompts, sampling, template=template,
                               progress=lambda n: progress.advance(task, n))
    if args.out:
        from align.files import write_jsonl

        out = Path(args.out)
        write_jsonl(out, ({"prompt": p, "completion": c} for p, c in zip(prompts, completions)))
        console.print(f"{len(completions)} completions written to {out}")
    else:
        for prompt, completion in zip(prompts, completions):
            console.rule(style="dim")
            console.print(f"[bold]prompt:[/bold] {prompt}")
            console.print(f"[bold]completion:[/bold] {completion}")


def _label_serve(args) -> None:
    from align.labeling import server

    if args.action != "start" and args.port is not None:
        raise AlignError(f"--port is for starting the server, not for '{args.action}'")
    if args.action == "stop":
        server.stop_command()
    elif args.action == "status":
        server.status_command()
    else:
        server.serve_command(args.port)


def _label_add_user(args) -> None:
    from align.labeling import server

    server.add_user_command(args.name, args.role)


def _registry_list(args) -> None:
    from align.registry import Registry, print_list
    from align.reporting import console

    print_list(console, Registry().list(stage=args.stage))


def _registry_show(args) -> None:
    from align.registry import Registry, print_show
    from align.reporting import console

    registry = Registry()
    print_show(console, registry.resolve(args.ref), registry)


def _registry_lineage(args) -> None:
    from align.registry import Registry, print_lineage
    from align.reporting import console

    print_lineage(console, Registry(), args.ref)


# --- label: rankings handlers (labeling/rankings.py) ---

def _label_push(args) -> None:
    from align.generation import SamplingConfig
    from align.labeling import rankings

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)
    rankings.push_command(model=args.model, prompts_path=args.prompts, k=args.k, dataset=args.dataset,
                          sampling=sampling, annotators_per_record=args.annotators_per_record,
                          workspace=args.workspace, guidelines_file=args.guidelines, log_every=args.log_every,
                          select=args.select, budget=args.budget, reward_models=args.reward_models,
                          mix_model=args.mix_model, mix_k=args.mix_k)


def _label_status(args) -> None:
    from align.labeling import rankings

    rankings.status_command(args.dataset, args.workspace)


def _label_pull(args) -> None:
    from align.labeling import rankings

    rankings.pull_command(args.dataset, args.out, ties=args.ties, aggregate=args.aggregate, workspace=args.workspace)


def _label_simulate(args) -> None:
    from align.labeling import rankings

    rankings.simulate_command(args.dataset, args.annotators, args.gold, noise=args.noise, seed=args.seed,
                              workspace=args.workspace, tie_margin=args.tie_margin)


if __name__ == "__main__":
    sys.exit(main())
