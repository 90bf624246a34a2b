# eqrecon: `make train` trains the demo preset end to end; `make test` runs the test suite
# (`make test-fast`: the unit lane, without the integration tests).
# Both create the virtual environment on first use (.venv, the project installed editable).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eqrecon-installed

# `make train RUN=runs/mine TRAIN_ARGS="--steps 50 --data.loader=reference"` to change the defaults.
RUN        := runs/demo-$(shell date +%Y%m%d-%H%M%S)
TRAIN_ARGS ?=
# One process per GPU, or one CPU process.
NPROC = $$($(PY) -c "import torch; print(max(1, torch.cuda.device_count()))")

# DALI ships Linux wheels only; elsewhere the reference loader is the input pipeline.
EXTRAS := $(shell [ "$$(uname -s)" = Linux ] && echo dev,dali || echo dev)

.PHONY: setup test test-fast test-lowest train

setup: $(STAMP)

# Re-install only when the package metadata changed; otherwise `make setup` is a no-op.
# editable_mode=compat puts the repo root on sys.path, so `model`, `kernels`, `train` resolve to the
# packages even where pytest also puts tests/ (whose tests/model etc. would shadow them as namespaces).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" --config-settings editable_mode=compat
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=30

# The unit lane: the tests not marked integration (no process launches, no training runs; tests/conftest.py
# fails a unit test that starts either).
test-fast: setup
	$(PY) -m pytest -q -m "not integration"

# The suite again on the lowest versions pyproject.toml allows, in .venv-lowest (.ci/lowest says how).
PYTEST_ARGS ?=
test-lowest: setup
	bash .ci/lowest $(PYTEST_ARGS)

# Demo photos -> shards (cached), train the `demo` preset (GPU when present), export the backbone,
# then probe it: R² of a ridge readout of rotation and translation from (x, g_θ(x)) embeddings,
# cross-validated over source photos, beside the random-init twin and raw pixels (~5.5 min on 2 idle cores,
# the probe 22 s).
train: setup
	@$(PY) -c "from pipeline.demo import ensure_demo_shards; print('demo shards:', ensure_demo_shards())"
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train/main.py --preset demo --out $(RUN) $(TRAIN_ARGS)
	$(PY) train/export.py --ckpt $(RUN)/ckpt/last.pt --out $(RUN)/backbone
	$(PY) train/probe.py equivariance --backbone $(RUN)/backbone --split train,val --transforms rotation,translation --part all,eq --out $(RUN)/probe-equivariance.json
	@echo ""
	@echo "run:             $(RUN)  (config.json, metrics.jsonl, ckpt/last.pt)"
	@echo "reconstructions: $(RUN)/recon.png  (rows: view 1 | view 2 | targets | predictions | |prediction - target|)"
	@echo "probe (R²):      $(RUN)/probe-equivariance.json"
	@echo "backbone:        $(RUN)/backbone/  (timm.create_model(\"local-dir:$(RUN)/backbone\", pretrained=True))"
