# Two commands do all the set-up on a fresh machine:
#   make demo   - install (once), generate synthetic data, train a tiny Mask2Former on CPU,
#                 score it LB-style, write a submission CSV and overlay pictures
#   make test   - install (once), run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-build.txt tools/install_detectron2.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q 'pip>=23,<25'
	$(PIP) install -r requirements-build.txt
	$(PIP) install --no-build-isolation -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(TEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
