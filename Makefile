# Two commands for a fresh clone: `make demo` (the main job) and `make test` (the tests).
SHELL := /bin/bash
REPO := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
export PYTHONPATH := $(REPO)
export HF_HUB_OFFLINE := 1
VENV = $(shell $(REPO)/deploy/venv.sh)
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean

venv:
	@$(REPO)/deploy/venv.sh >/dev/null

demo: venv
	$(VENV)/bin/python -m streams.cli demo $(ARGS)

test: venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf .lsti .pytest_cache
