# funai: six papers' code, one umbrella. `make help` lists the targets.
# Everything runs inside .venv, created and filled on first use.

PAPERS := sharelock pin neco fungi counting dora
PRESENT := $(foreach p,$(PAPERS),$(if $(wildcard $(p)/pyproject.toml),$(p)))
# common/ takes the per-package targets too: make test-common, make common-demo.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The PyTorch build to install; override for your CUDA, e.g.
#   make install TORCH_PACKAGES="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-gpu demo lint format clean

help: ## List the targets
	@echo "Usage: make <target> [ARGS='key=value ...']"
	@grep -hE '^[a-zA-Z%_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  %-22s %s\n", $$1, $$2}'
	@printf "  %-22s %s\n" "<paper>-<command>" "Any other console script of a paper, e.g. make fungi-extract ARGS=\"...\""
	@echo "Papers present: $(PRESENT)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install $(TORCH_PACKAGES)
	touch $@

$(STAMP): $(VENV)/.torch requirements-dev.txt common/pyproject.toml $(foreach p,$(PRESENT),$(p)/pyproject.toml)
	$(PIP) install -r requirements-dev.txt -e "./common[faiss-cpu,demo]" $(foreach p,$(PRESENT),-e "./$(p)[test]")
	touch $@

install: $(STAMP) ## Create .venv and install common and every paper package (editable)

test: $(STAMP) ## Run the whole test suite
	$(BIN)/python -m pytest common/tests $(foreach p,$(PRESENT),$(p)/tests) -q --continue-on-collection-errors

test-gpu: $(STAMP) ## The CUDA-only tests (marked gpu); fails without a visible GPU instead of skipping
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: no CUDA device visible to torch')"
	$(BIN)/python -m pytest common/tests $(foreach p,$(PRESENT),$(p)/tests) -q -m gpu

demo: $(STAMP) ## Run every package's demo on embedded data and print one summary table
	@status=0; for p in common $(PRESENT); do \
	  echo "== $$p demo"; $(BIN)/$$p-demo || { echo "!! $$p demo failed"; status=1; }; \
	done; $(BIN)/python scripts/demo_summary.py runs/demo; exit $$status

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove the virtual environment and runs
	rm -rf $(VENV) runs

# Per-paper targets: make <paper>-train|-eval|-demo ARGS="...", make test-<paper>, make install-<paper>.
# The paper is checked before anything is installed, so a missing one fails at once.
define require_paper
	@if [ ! -f "$(1)/pyproject.toml" ]; then \
	  echo "error: no package '$(1)' in this checkout (available: common $(PRESENT))" >&2; exit 2; fi
endef

install-%: ## Install common and one paper package only
	$(call require_paper,$*)
	@$(MAKE) --no-print-directory $(VENV)/.torch
	$(PIP) install -r requirements-dev.txt -e "./common[faiss-cpu,demo]" -e "./$*[test]"

test-%: ## Tests of one paper package
	$(call require_paper,$*)
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m pytest $*/tests -q

# common has evaluators (funai-knn, funai-hummingbird) but no train/eval scripts.
define require_trainable
	@if [ "$(1)" = common ]; then \
	  echo "error: common has no $(2) script; use $(BIN)/funai-knn or $(BIN)/funai-hummingbird" >&2; exit 2; fi
endef

%-train: ## Train a paper's method (default config), e.g. make neco-train ARGS="--config neco/configs/tiny.yaml"
	$(call require_trainable,$*,train)
	$(call require_paper,$*)
	@$(MAKE) --no-print-directory install
	$(BIN)/$*-train $(ARGS)

%-eval: ## Evaluate a paper's checkpoint, e.g. make neco-eval ARGS="..."
	$(call require_trainable,$*,eval)
	$(call require_paper,$*)
	@$(MAKE) --no-print-directory install
	$(BIN)/$*-eval $(ARGS)

%-demo: ## A paper's demo on embedded data
	$(call require_paper,$*)
	@$(MAKE) --no-print-directory install
	$(BIN)/$*-demo $(ARGS)

# Every other console script of a paper the same way: make fungi-extract, make dora-visualise, make sharelock-features.
define paper_command_rule
$(1)-%:
	@$$(MAKE) --no-print-directory install
	@if [ ! -x "$$(BIN)/$(1)-$$*" ]; then \
	  echo "error: $(1) has no command $(1)-$$* (its commands: $$$$(cd $$(BIN) && echo $(1)-*))" >&2; exit 2; fi
	$$(BIN)/$(1)-$$* $$(ARGS)
endef
$(foreach p,$(PRESENT),$(eval $(call paper_command_rule,$(p))))
