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

.PHONY: install up test test-fast lint check-alerts bench chaos services clean sdk

install: $(STAMP)

$(STAMP): requirements/*.txt scripts/install.sh
	./scripts/install.sh
	touch $(STAMP)

services: install
	./scripts/ensure_services.sh
	$(PY) -c 'import asyncio, os; from timbre_common.supervisor import ensure_database; asyncio.run(ensure_database(os.environ["DATABASE_URL"]))'

up: install services
	$(PY) -m timbre_common.supervisor

test: install services
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Prometheus alert rules: promtool accepts them and they fire when they should (deploy/prometheus).
check-alerts:
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml

# Everything but the end-to-end suite.
test-fast: install services
	$(PY) -m pytest -q --ignore=tests/e2e

# The Python SDK and `timbre` CLI as a wheel in dist/ (offline: the venv's setuptools, no build isolation).
sdk: install
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist clients/python
	rm -rf clients/python/build clients/python/src/timbre.egg-info

# Speed and quality of the embedded voices, and of a qwen backend (random weights without a checkpoint).
bench: install
	$(PY) bench/tts_speed.py embedded --voice joe
	$(PY) bench/tts_speed.py embedded --voice heart
	$(PY) bench/tts_quality.py embedded --voice joe
	$(PY) bench/tts_quality.py embedded --voice heart
	$(PY) bench/tts_speed.py qwen3-0.6b
	$(PY) bench/tts_quality.py qwen3-0.6b
	$(PY) bench/downloads.py
	$(PY) bench/stream_latency.py
	$(PY) bench/load.py

# Fault injection under load (tests/chaos/chaos.py) on a private RabbitMQ node and PostgreSQL cluster:
# every service SIGKILLed and restarted, broker connections dropped, broker and database restarted.
CHAOS_JOBS ?= 40
CHAOS_CLIENTS ?= 4
chaos: install
	$(PY) tests/chaos/chaos.py --jobs $(CHAOS_JOBS) --clients $(CHAOS_CLIENTS)

clean:
	rm -rf var $(VENV)
