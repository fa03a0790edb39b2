# Two commands for a fresh machine: `make run` serves the packaged backbone + shipped adapters,
# `make test` runs the whole suite. Everything lives in .venv; torch's CPU build is installed first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install system-deps run run-reset test test-fast test-cluster lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# redis-server, nginx, envsubst for the cluster tests: apt-get installs the missing ones when run as root
system-deps:
	@.ci/system-deps.sh

# Serves a working copy of the shipped store (.run/store, made on the first run), so uploads, rollbacks
# and deletes never touch the tracked adapters_store/; `make run-reset` starts over from the shipped tasks.
RUN_STORE ?= .run/store
run: install
	@test -d $(RUN_STORE) || (mkdir -p $(dir $(RUN_STORE)) && cp -r adapters_store $(RUN_STORE) && rm -f $(RUN_STORE)/.lock)
	ADAPTER_SERVICE_STORE_DIR=$${ADAPTER_SERVICE_STORE_DIR:-$(RUN_STORE)} $(VENV)/bin/adapter-service serve

run-reset:
	rm -rf $(RUN_STORE)

# the whole suite, after the linter and the type checker
test: install system-deps lint typecheck
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration and not cluster and not peers"

test-cluster: install system-deps
	$(PY) -m pytest -q -m cluster

lint: install
	$(VENV)/bin/ruff check service tests bench

# mypy reads its settings from pyproject.toml ([tool.mypy]: service/, strict on modeling/ and runtime/)
typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# --- training: the shipped adapters and the accuracy report (docs/training.md, docs/accuracy.md) ----------
# `make train-shipped` retrains every bundle in adapters_store/ from ../shared/datasets (one run at a time,
# niced, 2 threads); `make baselines` runs head-only and full fine-tuning on the same data and budget;
# `make rescore-shipped` re-scores the shipped bundles through the engine. Results go to docs/results/.
DATA    ?= ../shared/datasets
STORE   ?= adapters_store
RESULTS ?= docs/results
TRAIN   := nice -n 10 $(VENV)/bin/adapter-service train --threads 2 --no-progress
SHIPPED := sst2 ag_news mrpc stsb conll2003 squad
# Houlsby adapters (after attention and FFN, m = 64); learning rates per mode picked on SST-2 dev
# (docs/accuracy.md, "How the settings were chosen")
ADAPTER   := --placement houlsby --bottleneck 64 --lr 2e-3
HEAD_ONLY := --lr 3e-3
FULL      := --lr 5e-5

EVAL_sst2      := $(DATA)/sst2/dev.tsv
EVAL_ag_news   := $(DATA)/ag_news/test.tsv
EVAL_mrpc      := $(DATA)/mrpc/dev.tsv
EVAL_stsb      := $(DATA)/stsb/dev.tsv
EVAL_conll2003 := $(DATA)/conll2003/test.txt
EVAL_squad     := $(DATA)/squad/dev_subset_xquad_en.json

ARGS_sst2      := --task sst2 --head classification --train $(DATA)/sst2/train.tsv --eval $(EVAL_sst2) \
                  --label-map 0=negative,1=positive --max-train-examples 20000 --epochs 2 --max-length 64
# The shipped sst2 bundle: every training row but a seeded 2,000-row holdout, which picks the best epoch (and
# picked the learning rate, 2e-3 over 1e-3: docs/accuracy.md); dev is scored only afterwards; its report is
# sst2-adapter-shipped.json. ARGS_sst2 above stays the equal-budget comparison with the baselines (20k rows
# x 2 epochs, dev picks the epoch; sst2-adapter.json).
SHIP_sst2      := --task sst2 --head classification --train $(DATA)/sst2/train.tsv --holdout 2000 \
                  --label-map 0=negative,1=positive --epochs 3 --max-length 64 --lr 2e-3
ARGS_ag_news   := --task ag_news --head classification --train $(DATA)/ag_news/train.tsv --eval $(EVAL_ag_news) \
                  --label-column label_name --epochs 3 --max-length 128
ARGS_mrpc      := --task mrpc --head classification --train $(DATA)/mrpc/train.tsv --eval $(EVAL_mrpc) \
                  --label-map 0=not_paraphrase,1=paraphrase --epochs 5 --max-length 128
ARGS_stsb      := --task stsb --head regression --train $(DATA)/stsb/train.tsv --eval $(EVAL_stsb) \
                  --epochs 5 --max-length 128
ARGS_conll2003 := --task conll2003 --head token-classification --train $(DATA)/conll2003/train.txt \
                  --eval $(EVAL_conll2003) --epochs 3 --max-length 256
# XQuAD has no train split: 8 of its 48 articles (random.Random(0)) are held out as the eval split
ARGS_squad     := --task squad --head qa --train $(EVAL_squad) --eval-articles 8 \
                  --epochs 10 --batch-size 16 --max-length 384

.PHONY: train-shipped baselines rescore-shipped accuracy-table $(addprefix train-,$(SHIPPED)) \
        $(addprefix baseline-,$(SHIPPED)) $(addprefix rescore-,$(SHIPPED))

train-shipped: $(addprefix train-,$(SHIPPED))
baselines: $(addprefix baseline-,$(SHIPPED))
rescore-shipped: $(addprefix rescore-,$(SHIPPED))

$(addprefix train-,$(SHIPPED)): train-%:
	rm -rf $(STORE)/$*
	$(TRAIN) --mode adapter $(ADAPTER) $(or $(SHIP_$*),$(ARGS_$*)) --store $(STORE) \
		--report $(RESULTS)/$*-adapter$(if $(SHIP_$*),-shipped).json

$(addprefix baseline-,$(SHIPPED)): baseline-%:
	$(TRAIN) $(ARGS_$*) --mode head-only $(HEAD_ONLY) --out build/baselines/$*-head-only.safetensors \
		--report $(RESULTS)/$*-head-only.json
	$(TRAIN) $(ARGS_$*) --mode full $(FULL) --report $(RESULTS)/$*-full.json

$(addprefix rescore-,$(SHIPPED)): rescore-%:
	nice -n 10 $(VENV)/bin/adapter-service evaluate --threads 2 --task $* --store $(STORE) \
		--eval $(EVAL_$*)

accuracy-table:
	$(PY) bench/accuracy_table.py $(RESULTS)
