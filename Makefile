# The two commands a newcomer needs:  `make run`  and  `make test`.
VENV := .venv/bin
PROMPT ?= Explain in a few sentences why the sky is blue.
POLICY ?= bastion

.PHONY: setup run test test-fast docs clean

setup:
	@bash scripts/setup.sh

run: setup            ## set up, then speculative generation on the embedded SmolLM2-135M-Instruct
	$(VENV)/specframe run --policy $(POLICY) --prompt "$(PROMPT)"

test: setup           ## set up, then the whole test suite (real-model smoke tests included)
	$(VENV)/python -m pytest

test-fast: setup      ## the suite without the real-model tests
	$(VENV)/python -m pytest -m "not slow"

docs: setup
	$(VENV)/mkdocs build --strict

clean:
	rm -rf .venv site .pytest_cache .hypothesis
