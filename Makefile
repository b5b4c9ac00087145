# Two commands do all set-up on a fresh machine:
#   make demo   build the environment, then run the whole sender -> payload -> receiver path
#   make test   build the environment, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plada-installed

.PHONY: demo compare test soak lint clean

# Bytecode is written by the first process that imports a module, not compiled ahead:
# the suite and the demo import about a quarter of the environment's 16,000 files, and
# compiling all of them took 72 s of CPU (36 s on 2 cores) against ~15 s for those used.
# PYTHONDONTWRITEBYTECODE, where a shell sets it, is lifted for these commands: otherwise
# every process would compile torch again on import.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,distributed]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.demo --work work/demo

# every scheme, three seeds, the random controls and the pixel baseline, side by side
compare: $(STAMP)
	$(PY) -m benchmarks.compare --work work/demo

# two test processes (pytest-xdist), each test file kept in one of them so that its
# module fixtures are built once; the slowest tests are listed at the end
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# the full soak of the receiver daemon (200 intake passes, framed payloads among forged
# and junk frames, 3 SIGKILLs; under a minute)
soak: $(STAMP)
	PLADA_SOAK=full $(PY) -m pytest -q -s tests/test_soak.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf work .pytest_cache .ruff_cache
