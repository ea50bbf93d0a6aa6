#!/usr/bin/env bash
# The held-out try (docs/COLD_START.md): MovieLens written as a team's own tables, prepared apart, fine-tuned
# from the Amazon Scientific pretraining runs of the cross-catalogue grid (runs/xc5/a, one per seed) with the
# README's commands. Each run is skipped once its eval.json exists, so the script resumes.
set -euo pipefail
HERE=docs/cold_start/movielens-tables
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/ho}
D=data/ho/ml-tables
[ -d $RUNS/tables ] || $PY $HERE/make_tables.py --src ../shared/data/movielens-latest-small --out $RUNS/tables
[ -d $D ] || $PY -m train.prepare tables --src $RUNS/tables --out $D --key-prefix ml:
pretrained() { echo runs/xc5/a/pretrain/text-on-history-auto/seed-$1; }
for S in 0 1 2 3 4; do
  [ -f $RUNS/s$S/zero/eval.json ] || $PY -m train.finetune --pretrained $(pretrained $S) --data $D \
    --workdir $RUNS/s$S/zero --strategy zero-shot train.seed=$S
done
for F in 0.01 0.1 1; do
  for S in 0 1 2 3 4; do
    [ -f $RUNS/s$S/ft-$F/eval.json ] || $PY -m train.finetune --pretrained $(pretrained $S) --data $D \
      --workdir $RUNS/s$S/ft-$F train.seed=$S data.train_fraction=$F
    [ -f $RUNS/s$S/scratch-$F/eval.json ] || $PY -m train.finetune --pretrained $(pretrained $S) --data $D \
      --workdir $RUNS/s$S/scratch-$F --strategy scratch train.seed=$S data.train_fraction=$F
  done
done
$PY $HERE/summarize.py --runs $RUNS --out $HERE
