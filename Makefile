# Two set-up commands: `make demo` and `make test`. Both create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install test demo clean

# The runtime (all `make demo` needs: the library never imports torch) ...
$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# ... and the test extras on top: CPU torch, diffusers and transformers as numerical references.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	# lpips (the LPIPS reference) without its torchvision dependency: PyPI's torchvision does not
	# match the local CPU torch; tests give lpips the VGG16 layout it needs.
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	# pytorch-fid (the FID reference) + torchvision's pure-Python models, kept off sys.path (tests/reference_pkgs.py).
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/reference_pkgs torchvision==0.28.0 pytorch-fid==0.3.0
	# tests/test_serve.py drives the web page in Debian's chromium (apt; through sudo when not root)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# pytest under the CPU malloc settings (on the CPU backend only; XLA:CPU steps faster and steadier):
# ldm_jax/runtime.py sets GLIBC_TUNABLES and execs the command, as `ldm-jax` does for itself.
# One worker per core (at most 4; a test file stays on one worker, so its module fixtures are built
# once; the longest files first: tests/conftest.py): a serial run leaves a core idle while a test
# traces or compiles.
test: $(TEST_STAMP)
	$(PY) -m ldm_jax.runtime $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations 15 tests

demo: $(STAMP)
	$(VENV)/bin/ldm-jax demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
