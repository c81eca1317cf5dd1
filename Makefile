# The test command of the README: its own virtual environment, the project with its
# test extra, then the tests. .ci/run calls exactly this.
VENV ?= .venv
PYTHON ?= python3

.PHONY: test
test:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	$(VENV)/bin/python -m pytest
