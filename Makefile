# The two commands of the README. Both work on a fresh machine with only Python 3.11+:
# they make a virtual environment in .venv, install microdit into it, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the environment has none (the venv sees system packages).
# Set TORCH_SPEC to the build you want, e.g. TORCH_SPEC='torch==2.13.0' (our CPU machines).
TORCH_SPEC ?= torch==2.13.0
# The requirements of one optional extra, read from pyproject.toml (installing them directly
# does not rebuild the extension the way `pip install -e .[extra]` would).
EXTRA := $(PY) -c "import sys, tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))"
# The MDS tests write shards with mosaicml-streaming's MDSWriter; microdit reads MDS without it.
# --no-deps: streaming's own requirements pull torchvision, and with it a torch of their choosing.
MDS_WRITER := mosaicml-streaming xxhash zstd python-snappy cramjam Brotli catalogue
SOURCES := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test test-fast clean

# The demo needs the encoders (hf) and logs; the tests also exercise Triton (interpreter) and
# DALI (CPU-only), which are optional: where they cannot install, their tests skip with a reason.
$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[hf,logs]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install $$($(EXTRA) test)
	$(PY) -m pip install --no-deps $$($(EXTRA) eval) || echo "NOTE: eval extra not installable here; FID/KID and CLIP-score library checks are skipped"
	$(PY) -m pip install $$($(EXTRA) triton) || echo "NOTE: triton not installable here; Triton backends and tests are skipped"
	$(PY) -m pip install $$($(EXTRA) dali) || echo "NOTE: DALI not installable here; DALI loader tests are skipped"
	$(PY) -m pip install --no-deps $$($(EXTRA) fp8) || echo "NOTE: torchao not installable here; its FP8 backend tests are skipped"
	$(PY) -m pip install --no-deps $(MDS_WRITER) || echo "NOTE: mosaicml-streaming not installable here; MDS tests are skipped"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m microdit.cli demo --out runs/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info microdit/_C*.so runs
