# Two entry points: `make demo` (the CPU demo) and `make test` (the test suite). Each sets up its own venv.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is enough for the demo and the tests; override for a CUDA build, e.g. TORCH_SPEC=torch==2.14.1
# (with nvcc on the PATH or CUDA_HOME set, setup.py then also compiles the CUDA kernels of csrc/cuda).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaphi-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml csrc/*.cpp $(wildcard csrc/cuda/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" setuptools wheel pybind11 ninja
	@start=$$(date +%s); $(PY) -m pip install --quiet --no-build-isolation -e ".[dev]" && \
		echo "make: megaphi installed, extensions built, in $$(( $$(date +%s) - start ))s"
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf build *.egg-info megaphi/*.so demo_out
