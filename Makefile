# The two commands of the README. Each sets up the environment first (idempotent, cached: seconds once built).
PY := .venv/bin/python
.PHONY: setup demo test test-fast clean-venv

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not heavy"

clean-venv:
	rm -rf .venv
