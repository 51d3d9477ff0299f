# Two commands set up a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve-streams test lint typecheck pytest browser conformance bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@echo "Serving the example entities (counter, chat, fanout, assistant, cli) on http://127.0.0.1:4437 (console: /ui/); try, in another shell:"
	@echo "  .venv/bin/entities spawn /counter/c1"
	@echo "  .venv/bin/entities send /counter/c1 '{\"add\": 2}' --json --wait 5    (--json: the message is JSON; prints the reply, 2)"
	@echo "  .venv/bin/entities inspect /counter/c1"
	@echo "  .venv/bin/entities run examples/chat.py:registry /chat/c1 'hello'    (same database: it shows up here too)"
	$(BIN)/entities serve examples.all:registry --db sqlite:///.entities/entities.db

serve-streams: install
	@echo "Serving the Durable Streams protocol alone on http://127.0.0.1:4437/v1/stream/{path}; try:"
	@echo "  curl -X PUT -H 'Content-Type: text/plain' --data 'hello' http://127.0.0.1:4437/v1/stream/demo"
	@echo "  curl -X POST -H 'Content-Type: text/plain' --data ' world' http://127.0.0.1:4437/v1/stream/demo"
	@echo "  curl -N 'http://127.0.0.1:4437/v1/stream/demo?offset=-1&live=sse'   (tail it live)"
	$(BIN)/python -m streams serve --db sqlite:///.entities/entities.db --host 127.0.0.1 --port 4437

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy streams entities tests

# The console's browser tests drive Debian's Chromium at /usr/bin/chromium (Playwright's own
# browser downloads are never used): installed here when missing and we are root (CI is);
# otherwise those tests skip, or fail under ENTITIES_REQUIRE_BROWSER=1.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
		|| echo "no /usr/bin/chromium (apt-get install chromium): the console's browser tests skip"

pytest: install browser
	$(BIN)/pytest

test: lint typecheck pytest

conformance: install
	$(BIN)/python -m tests.conformance.run

bench: install
	$(BIN)/python benchmarks/streams_append.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
