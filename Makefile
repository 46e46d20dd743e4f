# Both targets install what is missing first (Debian packages, .venv), as root.
PYTHON := .venv/bin/python
FREEZE ?= 20

.PHONY: setup demo test unit lab lint clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/shieldproxy demo --freeze $(FREEZE)

test: setup
	.venv/bin/ruff format --check shieldproxy tests bench
	.venv/bin/ruff check shieldproxy tests bench
	.venv/bin/mypy shieldproxy
	$(PYTHON) -m pytest -q

unit: setup
	$(PYTHON) -m pytest -q tests/unit

lab: setup
	$(PYTHON) -m pytest -q tests/lab

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
