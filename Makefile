# Everything a newcomer needs: `make demo` and `make test` set up the
# environment themselves (tools/env/install.sh; the first run builds mmcv's
# ops, about 20 minutes on 2 cores, a whole first install about 22; later
# runs reuse the cached wheel and take seconds).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: help install demo token-label-demo test lint pytest clean

help:
	@echo "make install  create $(VENV) with the pinned OpenMMLab 2.x stack"
	@echo "make demo     built-in data; train and evaluate one model per task"
	@echo "make test     lint, then the test suite"
	@echo "make token-label-demo  teacher, label maps, students with token labeling off/on"

# The stamp is refreshed whenever the pins or the installer change; the
# installer itself also checks each step and skips what is in place.
install: $(VENV)/.mmbiformer-installed

$(VENV)/.mmbiformer-installed: setup.cfg setup.py tools/env/install.sh
	bash tools/env/install.sh
	@touch $@

demo: install
	$(PY) tools/demo.py

token-label-demo: install
	$(PY) tools/token_label_demo.py

lint: install
	$(PY) -m ruff check .

pytest: install
	$(PY) -m pytest tests

test: lint pytest

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache work_dirs
