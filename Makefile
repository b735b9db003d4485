# subspace_nb: `make test` installs what is missing into .venv, then checks everything.
# A CUDA user picks another torch:  make install TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
SHELL := /bin/bash
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install export sync-check nbtest pytest test-min test check readme readme-check demo clean docs docs-check

$(STAMP): settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

export: install
	$(VENV)/bin/nbdev_export

# the exported package must be exactly what the notebooks say
sync-check: export
	@if [ -n "$$(git status --porcelain -- subspace_nb)" ]; then \
	  git status --porcelain -- subspace_nb; \
	  echo "subspace_nb/ differs from the notebooks: run nbdev_export and commit"; exit 1; fi

# Two worker processes share the machine's cores: one math thread each. Two threads per worker on two cores made a
# training step 16x slower (10 MiniLM steps: 4.4 s with one thread, 70.5 s with two, beside another busy process).
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

nbtest: install
	$(ONE_THREAD) $(VENV)/bin/nbdev_test --n_workers 2 --timing

# the suite in WORKERS processes (pytest-xdist); WORKERS=0 runs it in this one
WORKERS ?= 2
pytest: install
	$(ONE_THREAD) $(PY) -m pytest -q -n $(WORKERS) tests

# README.md is index.ipynb, executed, as markdown
README_CMD = $(ONE_THREAD) $(VENV)/bin/jupyter nbconvert --to notebook --execute --stdout nbs/index.ipynb 2>/dev/null \
	| $(VENV)/bin/jupyter nbconvert --stdin --to markdown --stdout --TagRemovePreprocessor.enabled=True --TagRemovePreprocessor.remove_cell_tags=hide 2>/dev/null

readme: install
	set -o pipefail; $(README_CMD) > README.md.new && mv README.md.new README.md

readme-check: install
	@set -o pipefail; $(README_CMD) | diff -u README.md - \
	  || { echo "README.md is out of date with nbs/index.ipynb: run make readme"; exit 1; }

# The suite on the oldest versions settings.ini claims: a second venv, rebuilt from scratch whenever settings.ini
# changes, with every requirement `pkg>=X` installed as `pkg==X` (tools/min_requirements.py derives the pins, so they
# are the declared floors and nothing else; torch first, from the same pin, so no other torch build is pulled in).
# Packages we do not declare get whatever pip resolves with those pins. The package itself goes in with --no-deps.
# MIN_TEST_TOOLS: what tests/ imports beyond the requirements, at current versions: pytest (and pytest-xdist, which
# runs it in WORKERS processes), hypothesis, and peft (dev extra: the tests that compare against HF PEFT import it).
MINVENV        := .venv-min
MINPY          := $(MINVENV)/bin/python
MINSTAMP       := $(MINVENV)/.installed
MIN_TEST_TOOLS ?= pytest pytest-xdist hypothesis peft

$(MINSTAMP): settings.ini setup.py tools/min_requirements.py
	rm -rf $(MINVENV)
	python3 -m venv $(MINVENV)
	$(MINPY) -m pip install -q --upgrade pip
	pins=$$(python3 tools/min_requirements.py torch) && $(MINPY) -m pip install -q $$pins
	pins=$$(python3 tools/min_requirements.py) && $(MINPY) -m pip install -q $$pins $(MIN_TEST_TOOLS)
	$(MINPY) -m pip install -q --no-deps -e .
	touch $@

# every declared floor installed exactly and importable, then the pytest suite
test-min: $(MINSTAMP)
	$(MINPY) tools/min_requirements.py --check
	$(ONE_THREAD) $(MINPY) -m pytest -q -n $(WORKERS) tests

test: sync-check nbtest pytest readme-check docs-check test-min

# everything but the docs site check: no Node, no browser
check: sync-check nbtest pytest readme-check test-min

# the site: the notebooks as committed (never executed) and the API reference, into _docs/ (docs/build.py)
DOCS_STAMP := $(VENV)/.docs-installed
MATHJAX    := docs/node_modules/mathjax/es5/tex-chtml-full.js

$(DOCS_STAMP): $(STAMP) docs/requirements.txt
	$(PY) -m pip install -q -r docs/requirements.txt
	touch $@

$(MATHJAX): docs/package.json docs/package-lock.json
	cd docs && npm ci --no-audit --no-fund --loglevel=error
	touch $@

docs: $(DOCS_STAMP) $(MATHJAX)
	$(PY) docs/build.py

# serve _docs/ locally, open pages in headless Chromium (Debian's, installed when missing), crawl every link
docs-check: docs
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(PY) tools/docs_check.py

demo: install
	$(VENV)/bin/subspace-demo

clean:
	rm -rf $(VENV) build dist *.egg-info _proc

# benchmarks against HF PEFT and the frozen-model limit (about an hour on 2 cores); tables on stdout, JSON in bench_results/
# a plumbing check at toy size: make bench BENCH_ARGS=--quick;  some parts: make bench BENCH_ARGS='--parts steps,memory'
.PHONY: bench
bench: install
	$(PY) -c "from subspace_nb.studies.bench import main; main()" $(BENCH_ARGS)
