# Two commands do all set-up on a fresh machine:
#   make demo   run the proxy in front of three simulated providers (aws, azure, gcp) on loopback
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean system-deps

# Debian packages the tests drive (command:package): a headless browser for the status page.
SYSTEM_TOOLS := chromium:chromium chromedriver:chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The hot modules are compiled with mypyc at install: editing them reinstalls (see setup.py).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard failover_proxy/*.py failover_proxy/dataplane/*.py)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/failover-proxy demo

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing with apt-get"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

test: $(VENV)/.installed system-deps
	$(BIN)/ruff check failover_proxy tests benchmarks
	$(BIN)/mypy --strict failover_proxy
	$(BIN)/pytest -q

# Installs nginx and wrk with apt-get when missing; prints req/s, p50, p99 and the ratio to nginx;
# then breaks a provider in every fault mode under load. Tables go to benchmarks/results/.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/proxy_vs_nginx.py
	$(BIN)/python benchmarks/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
