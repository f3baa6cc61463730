# Two commands set up and run a fresh machine: `make demo` and `make test`.
# Everything installs into .venv/ in the repository root.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; override for CUDA machines, e.g. `make test TORCH=torch`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

FIXTURE := tests/fixtures/official
DEMO_MODEL ?= $(FIXTURE)/checkpoints/nvila-lite

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	@echo "== nvila demo: tiny RANDOM-weight fixture checkpoint ($(DEMO_MODEL)); the answer is gibberish by design =="
	@echo "== (it shows the full pipeline: loading, tiling, vision, projector, fusion, decoding)              =="
	$(VENV)/bin/nvila infer --model $(DEMO_MODEL) --media $(FIXTURE)/media/china_800x600.png \
		--text "What is shown in this picture?" --max-new-tokens 24 --json
	$(VENV)/bin/nvila infer --model $(FIXTURE)/checkpoints/nvila-video --media $(FIXTURE)/media/clip_24f_12fps_176x144.avi \
		--text "Describe the motion in this clip." --max-new-tokens 24 --stream

clean:
	rm -rf $(VENV) .pytest_cache
