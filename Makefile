# Timbre: `make up` runs the whole platform locally, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Embedded defaults for `make up`; every one can be overridden from the environment.
export TIMBRE_ENV ?= dev
export ADMIN_SECRET ?= dev-admin-secret
export DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/timbre
export AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export STORAGE_BACKEND ?= fs
export STORAGE_ROOT ?= $(CURDIR)/var/blobs
export BILLING ?= off
export BACKENDS ?= embedded,qwen3-1.7b,qwen3-0.6b

.PHONY: install up test test-fast lint bench services clean

install: $(STAMP)

$(STAMP): requirements/*.txt scripts/install.sh
	./scripts/install.sh
	touch $(STAMP)

services:
	./scripts/ensure_services.sh

up: install services
	$(PY) -m timbre_common.supervisor

test: install services
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Everything but the end-to-end suite.
test-fast: install services
	$(PY) -m pytest -q --ignore=tests/e2e

# Speed and quality of the embedded voices, and of a qwen backend (random weights without a checkpoint).
bench: install
	$(PY) bench/tts_speed.py embedded --voice joe
	$(PY) bench/tts_speed.py embedded --voice heart
	$(PY) bench/tts_quality.py embedded --voice joe
	$(PY) bench/tts_quality.py embedded --voice heart
	$(PY) bench/tts_speed.py qwen3-0.6b
	$(PY) bench/tts_quality.py qwen3-0.6b
	$(PY) bench/stream_latency.py

clean:
	rm -rf var $(VENV)
