# Both targets build the same local virtual environment (.venv) from constraints.txt,
# so a fresh clone needs only Python 3.11 and the package index.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser bytecode demo test lint clean

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP) browser bytecode

# dataworth's own modules compiled ahead (pip does it for the installed packages; an editable install leaves it to
# the first import, and with PYTHONDONTWRITEBYTECODE set to every command's start: 0.2-0.3 s each here).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q dataworth flows tasks storage

# The headless browser the report's screenshot test renders with (Debian's chromium-headless-shell): installed
# when missing and root (CI), else the command to install it is printed (the test then skips).
BROWSER_PKG := chromium-headless-shell
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(BROWSER_PKG) || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends $(BROWSER_PKG); }; \
	else echo "no headless browser for the report test: run as root: apt-get install $(BROWSER_PKG)"; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/dataworth demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) dataworth-runs
