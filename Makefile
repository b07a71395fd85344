# dabdetr — developer commands. `make demo` and `make test` work on a fresh machine (see README).
PYTHON ?= python3
export MAX_JOBS ?= 2
# Packages from PyPI; torch resolves to the newest allowed build (a CUDA build on x86-64 Linux).
DEPS = torch ninja pybind11 numpy scipy pillow tqdm pycocotools pytest hypothesis
STAMP = build/.dabdetr-installed
STAMP_CPU = build/.dabdetr-installed-demo
SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: setup deps demo ops-demo train test bench bench-model compat clean

deps:
	$(PYTHON) -m pip install -q $(DEPS)

# Editable install; rebuilt only when the C++/CUDA sources or the build files change.
define INSTALL
	@mkdir -p build
	$(1) $(PYTHON) -m pip install -v -e . --no-build-isolation > build/install.log 2>&1 || (tail -60 build/install.log; exit 1)
	@echo "compiled (full log: build/install.log):"
	@grep -E '^ *\[[0-9]+/[0-9]+\] ' build/install.log | sed -E 's/^ *(\[[0-9]+\/[0-9]+\]) ([^ ]+) .* -c ([^ ]+) .*/  \1 \2 \3/' || true
	@$(PYTHON) -c "import dabdetr._ext as e; print('dabdetr._C loaded:', e.LOADED, '| CPU kernels:', e.HAS_CPU_KERNELS, '| CUDA kernels:', e.HAS_CUDA_KERNELS)"
endef

$(STAMP): $(SOURCES)
	$(MAKE) deps
	$(call INSTALL,)
	@touch $(STAMP)

# The demo's install: the CUDA kernels are skipped on a machine without an NVIDIA GPU (minutes of
# nvcc for nothing); an up-to-date full install is used as it is. `make test` builds them anyway.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
$(STAMP_CPU): $(SOURCES)
	@if [ -f $(STAMP) ] && [ -z "$$(find $(SOURCES) -newer $(STAMP))" ]; then echo "using the full install"; \
	else $(MAKE) deps && $(MAKE) --no-print-directory install-cpu; fi
	@touch $(STAMP_CPU)

.PHONY: install-cpu
install-cpu:
	$(call INSTALL,DABDETR_BUILD_CUDA=0)

setup: $(STAMP)

# The main job: DAB-DETR (the demo preset: tiny model) trained from scratch on the embedded synthetic
# COCO-format shapes dataset (generated on first use) on the CPU, then the 12 COCO AP/AR numbers
# and a PNG of predictions on validation images (runs/demo/predictions.png).
demo: $(if $(HAVE_GPU),$(STAMP),$(STAMP_CPU))
	$(PYTHON) -m dabdetr train --out runs/demo

# The fused ops' demo (values, gradients, speed, memory), then the op benchmark table.
ops-demo: setup
	$(PYTHON) -m dabdetr.demo
	$(PYTHON) benchmarks/bench_ops.py

# The whole suite, then the emulated CUDA kernels and the C++ CPU kernels under ASan + UBSan, then
# the Triton kernels under the interpreter (a separate process: with
# TRITON_INTERPRET=1 the shared op tests would also run Triton on CPU tensors), then every Triton
# kernel compiled to cubin for sm_80 and sm_90 (registers / shared memory report).
test: setup
	$(PYTHON) -m pytest -q tests
	$(PYTHON) tests/cuda_emu.py --asan
	$(PYTHON) tests/cpu_asan.py
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_triton.py
	$(PYTHON) benchmarks/triton_compile_report.py

bench: setup
	$(PYTHON) benchmarks/bench_ops.py

# The whole model (R50, float32 on this machine's default device): train step, inference, memory,
# FLOPs, breakdown; results in benchmarks/results/model_*.json/.md (see README, "Model benchmarks").
bench-model: setup
	$(PYTHON) benchmarks/bench_model.py --case 800x1333:1 --case 512x512:2

# The GPU machines' software stack on this CPU (Python 3.12, torch 2.11 -- whose extension builds
# are C++17, not C++20 --, Triton 3.6) in a venv: build the extension, CUDA kernels included, and
# run the tests, the interpreted Triton tests and the Triton compile report against it, before a
# GPU session finds a break. Downloads torch 2.11 (~5 GB) on first use. numpy < 2.3: Triton 3.6's
# interpreter fails on numpy 2.4+ (int() of a 1-element array).
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
COMPAT_VENV ?= build/venv-gpu-stack
compat:
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q torch==2.11.0 'numpy<2.3' ninja pybind11 scipy pillow tqdm pycocotools pytest hypothesis setuptools wheel
	$(COMPAT_VENV)/bin/pip install -q --no-deps --no-build-isolation -e . > build/compat-install.log 2>&1 || (tail -40 build/compat-install.log; exit 1)
	$(COMPAT_VENV)/bin/python -c "import sys, torch, triton, dabdetr._ext as e; print(sys.version.split()[0], torch.__version__, triton.__version__, 'CPU kernels:', e.HAS_CPU_KERNELS, 'CUDA kernels:', e.HAS_CUDA_KERNELS)"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_triton.py
	$(COMPAT_VENV)/bin/python benchmarks/triton_compile_report.py

train: demo

clean:
	rm -rf build dabdetr/_C*.so *.egg-info
