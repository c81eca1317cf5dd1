# The two set-up commands of the README. Each makes its own virtual environment in .venv and
# installs the project into it; .ci/run calls `make lint` and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: test test-fast lint quickstart install

install:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'

# lint: ruff (pyflakes, pycodestyle, import order; lines of at most 120 characters), run by .ci/run
lint: install
	$(VENV)/bin/ruff check lambda_search tests

# the tests: all of them (what CI runs)
test: install
	$(VENV)/bin/python -m pytest

# everyday work: the tests not marked slow (under 2 minutes on 2 CPU cores)
test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow"

# the main job: the quickstart lambda search on scikit-learn's bundled digits, then the final evaluation of
# its choice and the baseline on the held-out test images (about 2 min on 2 CPU cores)
quickstart: install
	$(VENV)/bin/lambda-search search studies/quickstart.toml
	$(VENV)/bin/lambda-search evaluate --storage sqlite:///studies/quickstart.db --study quickstart
