# The two commands of the README's quickstart, and what they build on.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# make run's ports: mail2alert's SMTP, the capture sink, the stand-in GoCD, mail2alert's http.
SMTP_PORT ?= 1025
SINK_PORT ?= 8025
GOCD_PORT ?= 8080
HTTP_PORT ?= 9025

.PHONY: run test lint typecheck pytest bench clean

# The console's browser test drives Debian's Chromium through Playwright (never its own
# browser download): installed here when missing, so that no test skips (root, as in CI).
CHROMIUM := /usr/bin/chromium

# The venv counts as made only once `venv` has succeeded ($(VENV)/.made): a failed or
# interrupted attempt (Debian without python3-venv, Ctrl-C) is removed and made again next time.
$(VENV)/.made:
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; on Debian: apt-get install python3 python3-venv" >&2; exit 1; }
	@echo "Creating $(VENV) with $$($(PYTHON) --version) ..."
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
	@touch $@

$(STAMP): pyproject.toml $(VENV)/.made
	@echo "Installing mail2alert and its tools into $(VENV) (about a minute the first time) ..."
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

## run: start mail2alert on examples/configuration.yml (localhost:1025) with a capture sink on localhost:8025
run: $(STAMP)
	$(BIN)/python examples/run_demo.py --smtp-port $(SMTP_PORT) --sink-port $(SINK_PORT) --gocd-port $(GOCD_PORT) --http-port $(HTTP_PORT)

## test: ruff, mypy --strict, and the whole pytest suite with branch coverage
test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make: $(CHROMIUM) is missing: install Debian's chromium package" >&2; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null

pytest: $(STAMP) $(CHROMIUM)
	$(BIN)/coverage erase
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml $(BIN)/python -m pytest --cov --cov-branch --cov-report=term $(PYTEST_ARGS)

## bench: throughput and latency figures (see bench/README.md)
bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .coverage .coverage.* .mypy_cache .ruff_cache .pytest_cache mail2alert-data examples/mail2alert-data
