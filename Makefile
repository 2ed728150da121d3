# Entry points for development and CI.  Everything runs in .venv, which `make env` creates or
# brings up to date with scripts/setup_env.py (a no-op taking a few seconds when nothing changed).

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PYTEST_FLAGS ?= -q -ra

.PHONY: all env vllm-env check-env test demo clean

all: test

env:
	$(PYTHON) scripts/setup_env.py

# The vLLM server environment (.venv-vllm/, about 6 GB) for the server backend's tests and
# `vlm3-ros serve`; `make test` runs those tests when it exists (CI creates it).
vllm-env:
	$(PYTHON) scripts/setup_env.py --with-vllm

check-env:
	$(PYTHON) scripts/setup_env.py --check

# pytest exits with 5 when it collects no tests; that is a failure here, like any non-zero status.
test: env
	@status=0; $(VENV_PY) -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

demo: env
	$(VENV)/bin/vlm3-ros demo

clean:
	rm -rf $(VENV) .venv-vllm .ros2 .pytest_cache .hypothesis build dist *.egg-info training/*.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
