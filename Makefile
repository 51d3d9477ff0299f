# Two commands set up a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest conformance bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@echo "Serving the example entities (counter, chat) on http://127.0.0.1:4437; try, in another shell:"
	@echo "  .venv/bin/entities send /counter/c1 '{\"add\": 2}' --json --wait 5   (after: .venv/bin/entities spawn /counter/c1)"
	@echo "  .venv/bin/entities run examples/chat.py:registry /chat/c1 'hello' --db sqlite:///.entities/entities.db"
	$(BIN)/entities serve examples.all:registry --db sqlite:///.entities/entities.db

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy streams entities tests

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

conformance: install
	$(BIN)/python -m tests.conformance.run

bench: install
	$(BIN)/python benchmarks/streams_append.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
