"""Pretrain the foundation model: `python -m train.pretrain --workdir DIR [--config NAME] [overrides]`.

Resumes from the latest checkpoint in DIR when there is one; writes DIR/eval.json and DIR/eval.md.
"""

from __future__ import annotations

from sr_jax.training import evaluation, trainer
from train import cli


def main(argv: list[str] | None = None) -> dict:
    args = cli.parse(cli.parser(__doc__), argv)
    cli.setup()
    result = trainer.fit(cli.resolve_config(args), args.workdir)
    print(evaluation.markdown_table(result))
    return result


if __name__ == "__main__":
    cli.interruptible(main)
