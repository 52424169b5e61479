# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all lint bench install clean data

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -c constraints.txt -e ".[dev,data,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the tests marked slow (L0 accuracy on full MNIST, ONNX export; about 5 min on two CPU cores); .ci/run runs them
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=0 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sparsewrap tests bench examples
	$(VENV)/bin/ruff format --check sparsewrap tests bench examples

# Fashion-MNIST for `--data fashion-mnist`, without root: Debian's package unpacked into .data/ (git-ignored);
# `sudo apt-get install dataset-fashion-mnist` puts the same files under /usr/share/datasets instead
DATA      ?= .data
FASHION   := $(DATA)/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

data: $(FASHION)

$(FASHION):
	mkdir -p $(DATA)/deb
	cd $(DATA)/deb && apt-get download dataset-fashion-mnist
	dpkg-deb -x $(DATA)/deb/dataset-fashion-mnist_*_all.deb $(DATA)
	rm -rf $(DATA)/deb
	touch $@

bench: $(STAMP)
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
