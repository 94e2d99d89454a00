# Two commands do all the set-up on a fresh machine:
#   make demo   - local Kafka + PostgreSQL, topics, worker, a simulated month of traffic
#   make test   - ruff and the whole test suite on real services
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser up down status topics demo test lint bench chaos clean fuzz-rules

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,tansu]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/ledger stack up

down: $(STAMP)
	$(BIN)/ledger stack down

status: $(STAMP)
	$(BIN)/ledger stack status

topics: up
	$(BIN)/ledger topics create

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The console's browser tests drive Debian's chromium through chromium-driver. Installed here
# when missing and we can (root with apt-get); otherwise the tests fail naming the packages.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PACKAGES) for the console's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(BROWSER_PACKAGES) \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		     --no-install-recommends $(BROWSER_PACKAGES); }; \
	else \
		echo "make: the console's browser tests need $(BROWSER_PACKAGES) (Debian packages):" \
		     "sudo apt-get install $(BROWSER_PACKAGES)" >&2; \
	fi

test: lint browser
	$(BIN)/pytest

# The billing rules' property tests with many more examples than `make test` runs (no services).
fuzz-rules: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/test_rules_properties.py -q

demo: $(STAMP)
	$(BIN)/ledger demo

bench: $(STAMP)
	$(BIN)/python -m ledger.bench

# Seeded fault injection on a private 3-broker Kafka cluster + PostgreSQL (see the README);
# pass options with CHAOS_ARGS, e.g. make chaos CHAOS_ARGS="--events 100000 --seed 7".
CHAOS_ARGS ?=
chaos: $(STAMP)
	$(BIN)/python -m ledger.chaos $(CHAOS_ARGS)

clean: down
	rm -rf "$$($(BIN)/python -c 'from ledger.settings import Settings; print(Settings.from_env().home)')"
