# `make train` and `make test` work on a fresh clone: they create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# Tests run in a pytest-xdist worker per logical CPU (at most 4), each with its share of the threads (conftest.py):
# much of the suite waits on subprocesses, start-up and single-threaded steps, which one process cannot overlap.
# Tests sharing a costly model run in one worker (loadgroup), which trains it once.
WORKERS := -n logical --maxprocesses 4 --dist loadgroup

.PHONY: install browser tcmalloc train test test-fast dashboard bench gpu-check docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision from this machine's disk (a wider range would pull a multi-GB CUDA build), with the
	# project in one resolve
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e '.[test]'
	# The face detector (MTCNN, weights in the wheel) pins an old torch: installed without its dependencies.
	$(PY) -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	# The video tracker (ByteTrack) asks for opencv-python beside the headless OpenCV: installed without its
	# dependencies (pyproject lists the ones it imports).
	$(PY) -m pip install --quiet --no-deps trackers==2.6.1
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the end-to-end dashboard test (Debian packages; needs root, as on CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# tcmalloc, which every command preloads when installed (faster and smaller than glibc's malloc for training;
# docs/speed.md). Debian package; needs root.
tcmalloc:
	@ldconfig -p | grep -q libtcmalloc_minimal.so.4 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }

train: $(STAMP)
	$(VENV)/bin/multitask train $(ARGS)

test: $(STAMP) browser tcmalloc
	$(PY) -m pytest $(WORKERS) --durations=12 $(ARGS)  # the slowest tests: what to shorten when the suite grows

test-fast: $(STAMP)
	$(PY) -m pytest $(WORKERS) -m "not slow" $(ARGS)

dashboard: $(STAMP)
	$(VENV)/bin/multitask dashboard $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/multitask bench $(ARGS)

# the first checks on a GPU machine, one line each (CUDA ones say SKIP where there is no GPU)
gpu-check: $(STAMP)
	$(VENV)/bin/multitask bench --gpu-check $(ARGS)

# docs/config.md from the typed config (a test fails when it is stale)
docs: $(STAMP)
	$(PY) -m multitask.config_reference docs/config.md

clean:
	rm -rf .cache .pytest_cache build *.egg-info
