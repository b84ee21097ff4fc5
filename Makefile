# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
# selective search lives only in the contrib build; it must be installed after
# opencv-python-headless (same cv2 folder) and at the same version.
OPENCV  := 4.13.0.92
export NO_ALBUMENTATIONS_UPDATE := 1
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1

.PHONY: install install-dev demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps --force-reinstall opencv-contrib-python-headless==$(OPENCV)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -e '.[dev,export]'
	$(BIN)/pip install --no-deps --force-reinstall opencv-contrib-python-headless==$(OPENCV)
	@command -v chromium >/dev/null || command -v /usr/bin/chromium >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/visiondet demo

lint: install-dev
	$(BIN)/ruff check --no-cache .

test: install-dev
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
