# objfs — every target installs what it needs itself (Debian packages, .venv, Go tools).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools/bin
STAMPS := .stamps
CSI_SPEC_VERSION := v1.12.0
CSI_SANITY_VERSION := v5.4.0
FAKE_GCS_VERSION := v1.56.1
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc util-linux procps
BENCH_APT_PACKAGES := s3fs linux-perf
export PATH := $(CURDIR)/$(VENV)/bin:$(TOOLS):$(PATH)

.PHONY: help deps apt venv tools proto lint typecheck check unit sanity test demo bench bench-deps bench-smoke clean

help:
	@echo "make demo    the main job, end to end on a local S3 server (no cluster needed)"
	@echo "make test    install everything the tests need, then lint, type-check, pytest and csi-sanity"
	@echo "make bench   side-by-side benchmarks against s3fs-fuse and rclone mount"

deps: apt venv tools proto

apt: $(STAMPS)/apt
$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | $(STAMPS)/apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

tools: $(TOOLS)/csi-sanity $(TOOLS)/fake-gcs-server
$(TOOLS)/csi-sanity:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) GOFLAGS=-mod=mod go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$(CSI_SANITY_VERSION)
$(TOOLS)/fake-gcs-server:
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) go install github.com/fsouza/fake-gcs-server@$(FAKE_GCS_VERSION)

proto: csi/v1/csi_pb2.py
csi/v1/csi_pb2.py: proto/build.sh | $(VENV)/.installed
	bash proto/build.sh $(CSI_SPEC_VERSION) $(CURDIR)/$(PY)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fusefs csi tests bench sanity

typecheck: $(VENV)/.installed proto
	$(VENV)/bin/mypy

check: lint typecheck

unit: deps
	$(PY) -m pytest -q -p no:cacheprovider tests

sanity: deps
	bash sanity/run.sh

test: deps check unit sanity bench-smoke

demo: deps
	$(PY) -m tests.demo

bench-deps: deps
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(PY) -m pip install -q -e '.[dev,bench]'

bench: bench-deps
	$(PY) -m bench $(BENCH_ARGS)

# The benchmarks once at a tiny size, every client: keeps the harness working (no timings judged).
bench-smoke: bench-deps
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .tools $(STAMPS) csi/v1 .mypy_cache .ruff_cache build *.egg-info
