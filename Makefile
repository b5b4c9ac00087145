# Two commands do all set-up on a fresh machine:
#   make demo   build the environment, then run the whole sender -> payload -> receiver path
#   make test   build the environment, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plada-installed

.PHONY: demo compare test soak lint clean

# bytecode is compiled once after the installs, on every core (pip compiles one file at
# a time: 93 s in all, against 82 s); it must be compiled ahead, as PYTHONDONTWRITEBYTECODE
# may be set, and then every process would compile torch again on import
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip
	$(PY) -m pip install --quiet --no-compile torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev,distributed]'
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true  # as pip: a file of a newer Python is skipped
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
