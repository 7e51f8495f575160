# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv, install torch 2.13.0 (CPU wheel) only when the venv has no torch,
# then the package with its extras.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev,onnx,hf]" "triton==3.6.0" scikit-learn matplotlib tqdm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m stl_compiler.demo

test: $(STAMP)
	$(VPY) -m ruff check stl_compiler tests benchmarks examples tools
	$(VPY) -m pytest -q -ra


clean:
	rm -rf $(VENV)
