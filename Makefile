# The two commands of the README: `make run` starts a server, `make test` runs the whole suite.
# Both prepare the machine first (scripts/setup.sh: system packages as root, then the virtualenv).
VENV ?= .venv
export VENV

.PHONY: setup run test bench clean

setup:
	@./scripts/setup.sh

run: setup
	$(VENV)/bin/nox-api serve

test:
	@NOX_SETUP_FOR=test ./scripts/setup.sh
	./scripts/test.sh

bench: setup
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
