# make demo   set up .venv and run the main job (train on the dates task, translate, quick bench)
# make test   set up .venv and run the test suite
#
# Set-up: a fresh machine without torch gets the CPU wheel torch==2.13.0 from $(TORCH_INDEX) (never
# a multi-GB CUDA build), then its dependencies and the rest from pip's usual indexes; a machine whose python3 already imports torch (a GPU box) reuses it through
# --system-site-packages and installs the package without touching its dependencies.
# The GPU machine's versions on a CPU box (a 5 GB venv: torch 2.11 exists only as a CUDA build):
#   make test VENV=.venv-gpu-stack TORCH_SPEC=torch==2.11.0 TRITON_SPEC=triton==3.6.0
PYTHON      ?= python3
VENV        ?= .venv
TRITON_SPEC ?= triton
TORCH_SPEC  ?= torch==2.13.0
# torch alone (no deps) from PyTorch's CPU index: PyPI's Linux torch is the CUDA build (several GB of
# nvidia-* wheels). pip's find-links (a local wheel cache) still apply; TORCH_INDEX= uses pip's own indexes
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# pytest-xdist workers for make test, where it is installed (the dev extra; not on the GPU box): the
# interpreter's tests are single-threaded numpy, so two cores run them ~2x faster. TEST_JOBS=0: one process
TEST_JOBS   ?= 2
# BASE_VENV=.venv: a venv holding only $(TRITON_SPEC), which takes torch, the test tools and the
# editable package from that (already set-up) venv through a site-dir .pth, its own triton first on
# sys.path. CI's triton-3.6 pass uses it: ~1 GB of disk and a torch install less than a full venv.
BASE_VENV   ?=
PY          := $(VENV)/bin/python

.PHONY: setup demo test aot aot36 bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@if [ -n "$(BASE_VENV)" ]; then \
	  echo "[setup] $(VENV): $(TRITON_SPEC) over $(BASE_VENV)'s packages"; \
	  test -x $(BASE_VENV)/bin/python || { echo "[setup] $(BASE_VENV) is not set up: make setup first"; exit 1; }; \
	  $(PYTHON) -m venv $(VENV) && \
	  base=$$(cd $(BASE_VENV) && $$PWD/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  own=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  echo "import site; site.addsitedir('$$base')" > "$$own/_fused_s2s_base_venv.pth" && \
	  $(PY) -m pip install -q --no-cache-dir --no-deps "$(TRITON_SPEC)"; \
	elif $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "[setup] using the torch that $(PYTHON) already has"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV) && \
	  $(PY) -m pip install -q --no-deps --no-build-isolation -e . && \
	  ($(PY) -m pip install -q pytest pytest-benchmark pytest-xdist scipy babel tqdm matplotlib 2>/dev/null || \
	   echo "[setup] no package registry: using the test tools already installed"); \
	else \
	  echo "[setup] fresh venv with $(TORCH_SPEC)"; \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install -q --no-cache-dir --no-deps "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && \
	  $(PY) -m pip install -q --no-cache-dir "$(TORCH_SPEC)" "$(TRITON_SPEC)" -e ".[dev,demo]"; \
	fi
	@$(PY) -c "import torch, triton; print('[setup] torch', torch.__version__, '| triton', triton.__version__, 'from', triton.__file__)"
	@touch $@

demo: setup
	$(PY) -m fused_s2s demo

test: setup
	$(PY) -m pytest $$($(PY) -c 'import xdist' 2>/dev/null && echo "-n $(TEST_JOBS)") $(PYTEST_ARGS)

# make aot AOT_ARGS=attention_forms   the audit of every attention config in every mask form
aot: setup
	env -u TRITON_INTERPRET $(PY) -m fused_s2s.aot $(AOT_ARGS)

# make aot36   the same under triton 3.6.0 for both archs (CI's 3.6 pass compiles sm_90 only; in
# session 8 this found a spill on sm_80 that CI had missed): a triton-only venv over .venv
aot36: setup
	$(MAKE) setup VENV=.venv-triton36 BASE_VENV=$(VENV) TRITON_SPEC=triton==3.6.0
	env -u TRITON_INTERPRET .venv-triton36/bin/python -m fused_s2s.aot $(AOT_ARGS)

bench: setup
	$(PY) -m fused_s2s bench

clean:
	rm -rf $(VENV) .venv-triton* .pytest_cache build *.egg-info

# make gpu-wheels   the pure-Python wheels the GPU machine lacks (babel; it has no network), in .whl/
# (git-ignored) for benchmarks/gpu_session.sh to install from: carry=[".whl"] (docs/gpu.md)
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform any -d .whl babel
	@git check-ignore -q .whl/ || echo "/.whl/" >> "$$(git rev-parse --git-path info/exclude)"
	@ls -l .whl
