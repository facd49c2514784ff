# oneword — every target installs what it needs on first use (.venv + an install stamp).
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.install-stamp
UI_STAMP := $(VENV)/.ui-install-stamp
export PYTHONUNBUFFERED := 1

# make variables → CLI flags, passed only when set
opt = $(if $(strip $(2)),$(1) "$(strip $(2))")

.PHONY: install test test-fast demo sample train eval figures weights pretrain-shapes pretrain-instances study-instances bench-concepts bench lint format \
	clean help gpu-wheels
help:
	@echo "make demo                    offline: learn a new word on the shipped shapes model"
	@echo "make test                    ruff + the whole pytest suite (CPU; Triton kernels interpreted)"
	@echo "make test-fast               the suite without the tests marked slow"
	@echo "make lint                    ruff check and ruff format --check (the one formatter); make format applies it"
	@echo "make install                 the virtual environment (.venv) with the test extras; install-ui adds gradio"
	@echo "make sample PROMPT=\"...\"     [MODEL=sd15|sd21|sd21-v|shapes|tiny] [CKPT=] [N=] [STEPS=] [SCALE=] ..."
	@echo "make edit IMAGE=a.png PROMPT=\"...\"  [MASK=m.png] [STRENGTH=0.75] [MASK_BLUR=4] + the options of make sample"
	@echo "make train CONCEPT=cat       [MODEL=] [STEPS=auto|N] [MAX_STEPS=6100] [RECIPE=fast|official] [BATCH=] [LR=] [INIT=] [TOKEN=] [VECTORS=] ..."
	@echo "make eval RUN=runs/<run>     the paper's CLIP image/text similarity [PROMPTS=] [N=] [STEPS=] [CLIP=]"
	@echo "make figures                 every paper figure [MODEL=] [CONCEPT=] [RUN=] [STEPS=] [N=]; one: make figure-<name>"
	@echo "make weights MODEL=sd15      download a public checkpoint (sha256-verified, resumable)"
	@echo "make pretrain-shapes         retrain the shipped shapes model from scratch (2 CPU cores, ~27 min)"
	@echo "make ui                      local web app: train, watch, generate [HOST=127.0.0.1] [PORT=7860] [DEVICE=]"
	@echo "make bench                   oneword vs diffusers on the same random SD1.5-size weights [DEVICE=] [QUICK=1]"
	@echo "make gpu-wheels              wheels for bash bench/gpu.sh on a bare GPU machine (into bench/wheels/)"
	@echo "make clean                   remove outputs/ and the tool caches"
	@echo "make pretrain-instances      train the instances model from scratch (≈ 45 min; resumable; [SEED=] [STEPS=] [THREADS=])"
	@echo "make study-instances         the paper's phenomena on 8 held-out instances × 2 seeds → experiments/RESULTS.md"
	@echo "make bench-concepts          time to concept: image-passes each training recipe needs on 8 instances"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: $(STAMP) $(UI_STAMP) browser lint
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not slow"

sample: $(STAMP)
	@test -n "$(PROMPT)" || { echo 'error: give PROMPT="a photo of a cat"' >&2; exit 2; }
	$(PYTHON) -m apps.sample --prompt "$(PROMPT)" $(call opt,--model,$(MODEL)) $(call opt,--ckpt,$(CKPT)) \
		$(call opt,--n,$(N)) $(call opt,--steps,$(STEPS)) $(call opt,--scale,$(SCALE)) \
		$(call opt,--sampler,$(SAMPLER)) $(call opt,--seed,$(SEED)) $(call opt,--H,$(H)) $(call opt,--W,$(W)) \
		$(call opt,--neg,$(NEG)) $(call opt,--out,$(OUT)) $(call opt,--device,$(DEVICE)) \
		$(call opt,--dtype,$(DTYPE)) $(call opt,--embedding,$(EMBEDDING)) $(call opt,--token,$(TOKEN)) \
		$(call opt,--attention,$(ATTENTION)) $(call opt,--eta,$(ETA)) $(call opt,--prediction,$(PREDICTION)) \
		$(if $(ALLOW_PICKLE),--allow-pickle) $(if $(COMPILE),--compile) $(if $(CUDA_GRAPH),--cuda-graph) \
		$(call opt,--best-of,$(BEST_OF)) $(call opt,--keep,$(KEEP)) $(call opt,--rank,$(RANK)) \
		$(call opt,--concept,$(CONCEPT)) $(call opt,--clip-weights,$(CLIP)) $(if $(DETERMINISTIC),--deterministic)

.PHONY: edit
edit: $(STAMP)
	@test -n "$(IMAGE)" || { echo 'error: give IMAGE=photo.png (and PROMPT="...", optionally MASK=mask.png)' >&2; exit 2; }
	@test -n "$(PROMPT)" || { echo 'error: give PROMPT="a photo of <cat> on a sofa"' >&2; exit 2; }
	$(PYTHON) -m apps.edit --image "$(IMAGE)" --prompt "$(PROMPT)" $(call opt,--mask,$(MASK)) \
		$(call opt,--strength,$(STRENGTH)) $(call opt,--mask-blur,$(MASK_BLUR)) $(call opt,--mask-dilate,$(MASK_DILATE)) \
		$(call opt,--model,$(MODEL)) $(call opt,--ckpt,$(CKPT)) $(call opt,--n,$(N)) $(call opt,--steps,$(STEPS)) \
		$(call opt,--scale,$(SCALE)) $(call opt,--sampler,$(SAMPLER)) $(call opt,--seed,$(SEED)) $(call opt,--neg,$(NEG)) \
		$(call opt,--out,$(OUT)) $(call opt,--device,$(DEVICE)) $(call opt,--dtype,$(DTYPE)) \
		$(call opt,--embedding,$(EMBEDDING)) $(call opt,--token,$(TOKEN)) $(call opt,--attention,$(ATTENTION)) \
		$(call opt,--eta,$(ETA)) $(call opt,--prediction,$(PREDICTION)) $(call opt,--batch-size,$(BATCH_SIZE)) \
		$(if $(ALLOW_PICKLE),--allow-pickle) $(if $(COMPILE),--compile) $(if $(DETERMINISTIC),--deterministic)

train: $(STAMP)
	@test -n "$(CONCEPT)" || { echo 'error: give CONCEPT=cat (a folder under experiments/concepts/ or a path)' >&2; exit 2; }
	$(PYTHON) -m inversion.train --concept "$(CONCEPT)" $(call opt,--model,$(MODEL)) $(call opt,--ckpt,$(CKPT)) \
		$(call opt,--steps,$(STEPS)) $(call opt,--max-steps,$(MAX_STEPS)) $(call opt,--recipe,$(RECIPE)) $(call opt,--batch,$(BATCH)) \
		$(call opt,--accum,$(ACCUM)) $(call opt,--lr,$(LR)) \
		$(call opt,--init,$(INIT)) $(call opt,--token,$(TOKEN)) $(call opt,--vectors,$(VECTORS)) \
		$(call opt,--size,$(SIZE)) $(call opt,--seed,$(SEED)) $(call opt,--out,$(OUT)) \
		$(call opt,--save-every,$(SAVE_EVERY)) $(call opt,--precision,$(PRECISION)) \
		$(call opt,--checkpointing,$(CHECKPOINTING)) $(call opt,--resume,$(RESUME)) \
		$(call opt,--templates,$(TEMPLATES)) $(call opt,--val-prompts,$(VAL_PROMPTS)) \
		$(call opt,--device,$(DEVICE)) $(call opt,--reg-weight,$(REG_WEIGHT)) $(if $(DETERMINISTIC),--deterministic) \
		$(if $(OVERWRITE),--overwrite) $(ARGS)

eval: $(STAMP)
	@test -n "$(RUN)" || { echo 'error: give RUN=runs/<your run>' >&2; exit 2; }
	$(PYTHON) -m inversion.evaluate --run "$(RUN)" $(call opt,--prompts,$(PROMPTS)) $(call opt,--n,$(N)) \
		$(call opt,--steps,$(STEPS)) $(call opt,--scale,$(SCALE)) $(call opt,--seed,$(SEED)) \
		$(call opt,--clip-weights,$(CLIP)) $(call opt,--model,$(MODEL)) $(call opt,--ckpt,$(CKPT)) \
		$(call opt,--device,$(DEVICE)) $(call opt,--out,$(OUT)) $(if $(OVERWRITE),--overwrite)

figure_opts = $(call opt,--model,$(MODEL)) $(call opt,--ckpt,$(CKPT)) $(call opt,--concept,$(CONCEPT)) \
	$(call opt,--run,$(RUN)) $(call opt,--out,$(OUT)) $(call opt,--steps,$(STEPS)) $(call opt,--n,$(N)) \
	$(call opt,--seed,$(SEED)) $(call opt,--device,$(DEVICE)) $(call opt,--clip-weights,$(CLIP)) \
	$(if $(OVERWRITE),--overwrite) $(ARGS)

figure-%: $(STAMP)
	$(PYTHON) -m experiments.figures $* $(figure_opts)

figures: $(STAMP)
	$(PYTHON) -m experiments.figures all $(figure_opts)

# the shipped model; rebuilt from scratch (~27 min on 2 cores) only if it is missing
weights/shapes.safetensors: | $(STAMP)
	$(PYTHON) -m experiments.shapes.pretrain

demo: $(STAMP) weights/shapes.safetensors
	$(PYTHON) -m experiments.shapes.demo $(call opt,--steps,$(STEPS)) $(call opt,--vectors,$(VECTORS)) $(ARGS)

pretrain-shapes: $(STAMP)
	$(PYTHON) -m experiments.shapes.pretrain $(call opt,--seed,$(SEED)) $(call opt,--steps,$(STEPS)) $(ARGS)

# wheels a bare GPU machine (CPython 3.12, torch/triton/transformers preinstalled) lacks, for bash bench/gpu.sh
GPU_WHEELS ?= bench/wheels
gpu-wheels: $(STAMP)
	$(PYTHON) -m pip download -q --dest $(GPU_WHEELS) --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-r bench/gpu-wheels.txt
	@ls $(GPU_WHEELS)/*.whl | wc -l | xargs echo "wheels in $(GPU_WHEELS):"; du -sh $(GPU_WHEELS)
pretrain-instances: $(STAMP)
	$(PYTHON) -m experiments.instances.pretrain $(call opt,--seed,$(SEED)) $(call opt,--steps,$(STEPS)) \
		$(call opt,--threads,$(THREADS)) $(ARGS)

study-instances: $(STAMP)
	$(PYTHON) -m experiments.instances.study $(ARGS)

bench-concepts: $(STAMP)
	$(PYTHON) -m experiments.instances.speed $(ARGS)

bench: $(STAMP)
	$(PYTHON) -m bench.run $(call opt,--device,$(DEVICE)) $(call opt,--threads,$(THREADS)) $(call opt,--out,$(OUT)) \
		$(if $(QUICK),--quick) $(ARGS)

weights: $(STAMP)
	@test -n "$(MODEL)" || { echo 'error: give MODEL=sd15|sd21|sd21-v|ldm-1.4b' >&2; exit 2; }
	$(PYTHON) -m weights.download $(MODEL) $(if $(UNVERIFIED),--unverified)

# the web app: its optional extra (gradio) is installed on first use, behind its own stamp
.PHONY: ui install-ui browser
# the web app's browser test needs Debian's chromium: installed when possible, else that test skips, saying why
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium could not be installed: the browser test will be skipped"
$(UI_STAMP): $(STAMP) pyproject.toml
	$(PYTHON) -m pip install -q -e '.[ui]'
	touch $(UI_STAMP)

install-ui: $(UI_STAMP)

ui: $(UI_STAMP)
	$(PYTHON) -m apps.ui $(call opt,--host,$(HOST)) $(call opt,--port,$(PORT)) $(call opt,--device,$(DEVICE))

clean:
	rm -rf outputs .pytest_cache .ruff_cache
