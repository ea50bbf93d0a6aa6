"""Fine-tune a pretrained run for cold start:
`python -m train.finetune --pretrained RUN --workdir DIR [--data DATASET] [--protocol new-domain|cold-items]
[--train-split S --eval-split S] [--strategy all|frozen|scratch|zero-shot|auto] [overrides]`.

Starts from RUN's saved config (model and data settings) with configs/finetune.py's schedule, on RUN's
dataset or `--data` (a dataset prepared apart, with ids, fields and texts of its own: its tables are read
through RUN's by raw key). The splits are the protocol's in the embedded dataset, else the dataset's
`train` and `test`, else those named. Restores RUN's parameters (a new domain starts from a pretrained
domain's rows, `finetune.new_domain_init`; fresh rows for new keys and fields; trainable whatever is frozen).
`--strategy`: `all` (the recommended default, docs/COLD_START.md) trains every level (where the new data hold at
least `finetune.scratch_above` times the pretraining run's training rows, and their validation data at least
`finetune.auto_min_valid` labels, the default also trains scratch and keeps the better on validation, as
`auto` does between those two: with more new labels than pretraining had, a warm start can generalise worse
than a fresh one; DIR is then a selection, which the other commands read as its kept run); `frozen` freezes L0 and
L1 (the paper's best split); `scratch` trains the same architecture from a fresh init on the same data and
schedule (the baseline a fine-tune must beat); `zero-shot` trains nothing and reads no label: the pretrained
model scores the new data as it is, each new domain through a pretrained domain's rows with the network's logit
constant, scored by that domain's content match (`new_domain_init=match`; the source: `finetune.domain_source`,
else the pretrained domain of its task); `auto` trains all, frozen and scratch under the same budget in
DIR/candidates/ and keeps the one the validation data prefer (DIR/strategy.json says which and by how much;
DIR/eval.json is its report). Resumes from DIR's latest checkpoint when there is one (the options must then
agree with DIR's saved config, or be left out); writes DIR/eval.json and DIR/eval.md. A folder holds one run:
a plain run's folder refuses `--strategy auto`, and a selection's folder every other strategy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from configs import finetune as finetune_config
from sr_jax import io
from sr_jax.config import Config, ConfigError, absolute_paths, load_config, override, validate
from sr_jax.data import synthetic
from sr_jax.data.schema import DatasetMeta
from sr_jax.protocols import ZERO_SHOT, protocol_splits, zero_shot
from sr_jax.training import evaluation, trainer
from sr_jax.training.records import result_folder
from sr_jax.training.spec import versus_scratch
from train import cli

log = logging.getLogger("sr_jax")


def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, named_configs=False)
    p.add_argument("--pretrained", help="the pretraining run folder (not needed to resume DIR)")
    p.add_argument("--data", help="the dataset to fine-tune on (default: the pretrained run's)")
    p.add_argument("--protocol", choices=sorted(finetune_config.PROTOCOLS), help="default: new-domain")
    p.add_argument("--train-split", help="the cold training split (default: see above)")
    p.add_argument("--eval-split", help="the split to evaluate on (default: see above)")
    p.add_argument("--strategy", choices=[*STRATEGIES, ZERO_SHOT, AUTO], help=f"default: {RECOMMENDED} (see above)")
    return p


# strategy -> the levels it freezes (None: no pretrained start); RECOMMENDED is what the evidence supports
STRATEGIES = {"all": (), "frozen": ("l0", "l1"), "scratch": None}
AUTO = "auto"  # every strategy of STRATEGIES, the one the validation data prefer kept
RECOMMENDED = "all"
VERSUS_SCRATCH = (RECOMMENDED, "scratch")  # the default's selection where the new data outnumber pretraining's
PLAN = "selection.json"  # a selection's strategies and why, written when it starts (what resuming reads)


def _start(args: argparse.Namespace) -> Config:
    """A new fine-tune (or scratch) config from the pretrained run's."""
    pretrained = load_config(Path(args.pretrained) / "config.json") if args.pretrained else Config()
    data_path = str(Path(args.data).absolute()) if args.data else pretrained.data.path
    names = DatasetMeta.read(data_path).splits if data_path else synthetic.SPLITS
    protocol = args.protocol or "new-domain"
    splits = protocol_splits(names, protocol, args.train_split or "", args.eval_split or "")
    cfg = finetune_config.get_config(pretrained, protocol, splits, data_path)
    return with_strategy(cfg, args.strategy or RECOMMENDED, args.pretrained)


def with_strategy(cfg: Config, strategy: str, pretrained: str | None) -> Config:
    """The fine-tune config under one of STRATEGIES, or ZERO_SHOT."""
    if strategy == ZERO_SHOT:
        cfg, strategy = zero_shot(cfg), "all"
    freeze = STRATEGIES[strategy]
    start = "" if freeze is None else str(Path(pretrained))
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pretrained=start, freeze=freeze or ()))


def _disagreements(args: argparse.Namespace, saved: Config) -> list[str]:
    """The options that contradict a run folder's saved config (a resume takes them from there)."""
    scratch = args.strategy == "scratch" and not saved.finetune.pretrained  # --pretrained gave it its architecture
    given = {
        "--pretrained": (
            not scratch and args.pretrained and str(Path(args.pretrained).absolute()),
            saved.finetune.pretrained,
        ),
        "--data": (args.data and str(Path(args.data).absolute()), saved.data.path),
        "--protocol": (args.protocol, saved.finetune.protocol),
        "--train-split": (args.train_split, saved.data.train_split),
        "--eval-split": (args.eval_split, saved.data.eval_split),
    }
    out = [f"{flag} {new} (the run has {old or 'none'})" for flag, (new, old) in given.items() if new and new != old]
    if args.strategy and args.strategy != AUTO and _strategy_of(saved) != args.strategy:
        out.append(f"--strategy {args.strategy} (the run's is {_strategy_of(saved)})")
    return out


def _strategy_of(cfg: Config) -> str:
    if not cfg.finetune.pretrained:
        return "scratch"
    if cfg.train.max_steps == 0:
        return ZERO_SHOT
    return next((s for s, f in STRATEGIES.items() if f == cfg.finetune.freeze), "custom freeze")


def resolve(args: argparse.Namespace) -> Config:
    """The config the command runs with: DIR's saved one when resuming (options that contradict it are refused),
    else a new one from the pretrained run's; overrides on top, checked before anything is written."""
    saved = Path(args.workdir) / "config.json"
    if saved.exists():
        if problems := _disagreements(args, load_config(saved)):
            raise ConfigError(
                f"{saved}: this run was started with other settings: {'; '.join(problems)}. Leave these options out "
                "to resume it, or start another --workdir"
            )
        cfg = absolute_paths(validate(override(load_config(saved), args.overrides)))
        return cli.check_resume(saved, cfg, args.allow_changes)
    if not args.pretrained:
        raise ConfigError("--pretrained is required to start a fine-tune run (scratch too: its architecture)")
    return absolute_paths(validate(override(_start(args), args.overrides)))


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = cli.parse(p, argv)
    cli.setup()
    workdir = Path(args.workdir)
    if args.pretrained:  # a strategy selection pretrains as the run it kept
        args.pretrained = str(result_folder(args.pretrained))
    if args.strategy == AUTO:
        return auto(args)
    if args.strategy is None and (workdir / PLAN).exists():  # the default's selection, resumed
        plan = json.loads((workdir / PLAN).read_text())
        return auto(args, tuple(plan["strategies"]), plan["why"])
    try:
        cfg = resolve(args)
        why = None if args.strategy or (workdir / "config.json").exists() else versus_scratch(cfg)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    if why:
        log.info("%s: scratch is trained too and the better on validation kept (docs/COLD_START.md)", why)
        return auto(args, VERSUS_SCRATCH, why)
    result = trainer.fit(cfg, args.workdir)
    print(evaluation.markdown_table(result))
    return result


def auto(args: argparse.Namespace, strategies: tuple[str, ...] = tuple(STRATEGIES), why: str = "") -> dict:
    """Trains each of `strategies` on the same labelled budget in DIR/candidates/NAME (each resumable), keeps the
    one whose chosen step scored best on the validation data, and writes DIR/strategy.json and its report as
    DIR/eval.json and eval.md (with a `strategy` block). `why`: what made a default fine-tune a selection."""
    workdir = Path(args.workdir)
    with io.exclusive(workdir, "strategy selection"):
        io.claim(workdir, io.SELECTION, remedy="choose another --workdir (a folder holds one run)")
        io.mark(workdir, io.SELECTION)
        if not (workdir / PLAN).exists():
            with io.atomic_file(workdir / PLAN) as tmp:
                tmp.write_text(json.dumps({"strategies": list(strategies), "why": why}, indent=2) + "\n")
        return _select(args, workdir, strategies, why)


def _select(args: argparse.Namespace, workdir: Path, strategies: tuple[str, ...], why: str) -> dict:
    scores, results = {}, {}
    for name in strategies:  # RECOMMENDED first: with too few validation labels, the only one trained
        one = argparse.Namespace(**{**vars(args), "strategy": name, "workdir": str(workdir / "candidates" / name)})
        cfg = resolve(one)
        if not cfg.train.eval_every:
            raise ConfigError("--strategy auto chooses on validation scores: train.eval_every must be > 0")
        results[name] = trainer.fit(cfg, one.workdir)
        scores[name] = results[name]["validation"]["score"]
        log.info("strategy %s: validation %.4f", name, scores[name])
        labels, least = results[name]["budget"]["valid_examples"], cfg.finetune.auto_min_valid
        if labels < least:
            rule = f"{labels} validation labels < finetune.auto_min_valid={least}: {RECOMMENDED} kept, no choice made"
            log.info("%s (too few to choose among strategies; docs/COLD_START.md)", rule)
            break
    else:
        rule = f"the best validation score ({labels} validation labels)" + (f"; trained as {why}" if why else "")
    ranked = sorted(scores, key=scores.get, reverse=True)
    chosen = {
        "chosen": ranked[0],
        "rule": rule,
        "run": str((workdir / "candidates" / ranked[0]).absolute()),
        "margin": scores[ranked[0]] - scores[ranked[1]] if len(ranked) > 1 else None,  # over the runner-up
        "validation": scores,
        "metric": results[ranked[0]]["validation"]["metric"],
    }
    with io.atomic_file(workdir / "strategy.json") as tmp:
        tmp.write_text(json.dumps(chosen, indent=2) + "\n")
    result = {**results[ranked[0]], "strategy": chosen}
    evaluation.write_report(workdir, result)
    log.info("kept %s (validation %.4f; %s): its run is %s", ranked[0], scores[ranked[0]], rule, chosen["run"])
    print(evaluation.markdown_table(result))
    return result


if __name__ == "__main__":
    cli.interruptible(main)
