# Development entry points. `make run` serves on 127.0.0.1:8000; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format-check typecheck pytest openapi docs bench bench-peers bench-memory bench-hostile bench-api bench-cold soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: installs run again only when pyproject.toml changes.
$(VENV)/.installed-server: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-server  # the test extra includes the server

run: $(VENV)/.installed-server
	$(BIN)/tapeserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test /usr/bin/chromium /usr/sbin/nginx /usr/sbin/haproxy /usr/bin/redis-server /usr/bin/prometheus
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# Not part of `make test`: formatting is a convenience, not a gate.
format-check: $(VENV)/.installed-test
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# Regenerate openapi/openapi.json from the app (tests/api/test_openapi.py fails when it is stale).
openapi: $(VENV)/.installed-server
	$(BIN)/python -m service.api.openapi

# Regenerate the settings and limits tables in docs/configuration.md from service/api/settings.py.
docs: openapi
	$(BIN)/python scripts/settings_table.py --write

# Debian's Chromium for the playground's browser tests (Playwright drives it; it never downloads one).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# Debian's nginx runs the repo's load-balancer config in tests/deploy (two replicas on loopback).
/usr/sbin/nginx:
	command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }

# Debian's redis-server is the shared rate-limit store in tests (started on a free loopback port).
/usr/bin/redis-server:
	command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# Debian's haproxy runs the repo's load-balancer config (docker-compose's) in tests/deploy.
/usr/sbin/haproxy:
	command -v haproxy >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; }

# Debian's Prometheus evaluates the autoscaler's metrics-adapter rule against a live server in tests/deploy.
/usr/bin/prometheus:
	command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# wrk (Debian) drives the throughput workloads.
/usr/bin/wrk:
	command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# HOGS=2: everything runs beside two busy loops (someone else's work on the machine).
HOGS ?= 0
# RT=10: every server and the measuring client in SCHED_RR at 10 (needs CAP_SYS_NICE; see docs/performance.md).
RT ?= 0
bench: $(VENV)/.installed-server /usr/bin/wrk
	$(BIN)/python bench/run.py --hogs $(HOGS) --realtime $(RT)

# httpstan in its own venv (its pinned dependencies stay out of ours); it compiles the Stan model (~35 s).
bench/.peers/bin/python:
	$(PYTHON) -m venv bench/.peers
	bench/.peers/bin/python -m pip install --quiet httpstan

# The second peer, UM-Bridge's own server with a tf.function model (bench/umbridge_peer.py), runs from
# our venv: it needs TensorFlow (the server extra) and umbridge (the test extra).
bench-peers: $(VENV)/.installed-test /usr/bin/wrk bench/.peers/bin/python
	$(BIN)/python bench/run.py --peers --hogs $(HOGS) --realtime $(RT)

# Issue 21's rows only (tapeserve and httpstan: sequential, wrk 16, interleaved): idle, beside two busy
# loops, and beside them with every server and the client in SCHED_RR (needs CAP_SYS_NICE): about
# 3 x 1.5 minutes. results/hop.json, results/hop-hogs2.json and results/hop-hogs2-rt10.json.
bench-hop: $(VENV)/.installed-test /usr/bin/wrk bench/.peers/bin/python
	$(BIN)/python bench/run.py --peers --only hop
	$(BIN)/python bench/run.py --peers --only hop --hogs 2
	$(BIN)/python bench/run.py --peers --only hop --hogs 2 --realtime 10

# 10,000 distinct expressions (about 10 minutes): worker RSS stays under its bound.
bench-memory: $(VENV)/.installed-server /usr/bin/wrk
	$(BIN)/python bench/run.py --memory-only --memory 10000

# A hostile client (sub-floor deadlines, abandoned slow jobs, poison programs) next to an ordinary one.
bench-hostile: $(VENV)/.installed-server
	$(BIN)/python bench/hostile.py

# 64 connections over a mixed workload for SOAK_MINUTES (default 2); fails on any unexpected answer.
SOAK_MINUTES ?= 2
soak: $(VENV)/.installed-server
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) --connections 64

# Cold programs (issue 21 point 4): rosen10 gradient+Hessian and each model layer family, first request of a program.
bench-cold: $(VENV)/.installed-server
	$(BIN)/python bench/cold.py

# /healthz under the costliest bodies the limits allow, and the API's RSS over 10,000 distinct requests.
bench-api: $(VENV)/.installed-server
	$(BIN)/python bench/api_bounds.py
