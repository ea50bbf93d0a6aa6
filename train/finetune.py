"""Fine-tune a pretrained run for cold start:
`python -m train.finetune --pretrained RUN --workdir DIR [--protocol new-domain|cold-items] [overrides]`.

Starts from RUN's saved config (model and data) with configs/finetune.py's splits and schedule, restores
RUN's parameters (fresh rows for domains RUN never trained) and freezes `finetune.freeze` (default
l0,l1). Resumes from DIR's latest checkpoint when there is one; writes DIR/eval.json and DIR/eval.md.
"""

from __future__ import annotations

from pathlib import Path

from configs import finetune as finetune_config
from sr_jax.config import load_config, override, validate
from sr_jax.training import evaluation, trainer
from train import cli


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__, named_configs=False)
    p.add_argument("--pretrained", help="the pretraining run folder (not needed to resume DIR)")
    p.add_argument("--protocol", default="new-domain", choices=sorted(finetune_config.PROTOCOLS))
    args = p.parse_args(argv)
    cli.setup()
    saved = Path(args.workdir) / "config.json"
    if saved.exists():
        cfg = cli.check_resume(saved, validate(override(load_config(saved), args.overrides)), args.allow_changes)
    elif args.pretrained:
        pretrained = Path(args.pretrained).absolute()
        cfg = finetune_config.get_config(load_config(pretrained / "config.json"), args.protocol)
        cfg = override(cfg, [f"finetune.pretrained={pretrained}", *args.overrides])
    else:
        p.error("--pretrained is required to start a fine-tune run")
    result = trainer.fit(cfg, args.workdir)
    print(evaluation.markdown_table(result))
    return result


if __name__ == "__main__":
    cli.interruptible(main)
