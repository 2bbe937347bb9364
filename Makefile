# The two commands of the quickstart: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install bytecode lint bench clean vendor chromium

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) bytecode

# Python writes the project's bytecode on first use unless PYTHONDONTWRITEBYTECODE is
# set (as on some CI machines and container images); compiled here, no start of
# manage.py compiles the project's modules again (a third of its start-up time).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q config pipelines runs triggers io_connectors

# Web (ASGI), a django-q2 worker cluster and the scheduler, together; Ctrl-C stops all.
run: $(STAMP) bytecode
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensure_admin
	$(BIN)/python manage.py import_mage_project --keep-edited examples
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	@echo "Millrace at http://127.0.0.1:$${MILLRACE_PORT:-8000}/ (Ctrl-C stops web, worker and scheduler)"
	$(BIN)/honcho start -f Procfile

# The whole suite; against PostgreSQL when DATABASE_URL says so, else SQLite.
test: $(STAMP) chromium
	$(BIN)/pytest $(PYTEST_ARGS)

# The browser tests (tests/e2e) drive Debian's chromium through Playwright; Playwright's
# own browser download is never used.
chromium:
	@command -v chromium >/dev/null || { \
		echo "Installing Debian's chromium for the browser tests"; \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; \
		else sudo apt-get install -y -qq chromium; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(STAMP) bytecode
	$(BIN)/python bench/block_overhead.py

# Front-end code from the npm registry, vendored into static/vendor/ and committed, so
# that `make run` needs no Node and no page loads anything from a CDN. Run it (Node's
# npm needed) to change a version; commit what it writes.
HTMX_VERSION := 2.0.11
vendor:
	rm -rf var/npm && mkdir -p var/npm
	cd var/npm && npm pack --silent htmx.org@$(HTMX_VERSION) && tar xzf htmx.org-$(HTMX_VERSION).tgz
	cp var/npm/package/dist/htmx.min.js static/vendor/htmx.min.js
	cp var/npm/package/LICENSE static/vendor/htmx.LICENSE.txt
	rm -rf var/npm

clean:
	rm -rf $(VENV) var build *.egg-info
