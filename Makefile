# Two commands do all set-up on a fresh machine:
#   make demo   run the proxy in front of three simulated providers (aws, azure, gcp) on loopback
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-pure test-soak test-stress test-container bench bench-instructions clean system-deps

# Debian packages the tests drive (command:package): a headless browser for the status page,
# Prometheus and promtool for the metrics, alert rules and dashboard, nginx as the oracle of
# the differential conformance test.
SYSTEM_TOOLS := chromium:chromium chromedriver:chromium-driver prometheus:prometheus \
	promtool:prometheus nginx:nginx
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Headers the C extensions build against (header:package): libnghttp2 for the HTTP/2 codec
# (without it, or with FAILOVER_PROXY_PURE=1, HTTP/2 runs on the pure-Python h2 library).
BUILD_HEADERS := /usr/include/nghttp2/nghttp2.h:libnghttp2-dev

# The hot modules are compiled with mypyc at install: editing them reinstalls (see setup.py).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard failover_proxy/*.py failover_proxy/*/*.py failover_proxy/*/*/*.py failover_proxy/*/*/*.c)
	@[ "$$FAILOVER_PROXY_PURE" = 1 ] || { missing=""; for pair in $(BUILD_HEADERS); do 	  [ -e $${pair%%:*} ] || missing="$$missing $${pair#*:}"; done; 	if [ -n "$$missing" ]; then echo "installing$$missing with apt-get"; 	  $(SUDO) apt-get update -q && 	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; }
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

# The whole suite again as plain Python (FAILOVER_PROXY_PURE=1: no mypyc, no C extensions,
# reads and writes through the transports), in a copy of the checkout under build/pure so its
# install cannot disturb this one's compiled modules. Proves the fallback end to end.
test-pure:
	rm -rf build/pure && mkdir -p build/pure
	git ls-files -z --cached --others --exclude-standard | \
	  xargs -0 cp --parents --no-dereference -t build/pure
	cd build/pure && FAILOVER_PROXY_PURE=1 $(MAKE) --no-print-directory test PYTHON=$(PYTHON)

# One minute of benchmarks/soak.py (mixed load, a provider broken every few seconds, reloads):
# fails on an error seen by an idempotent request, RSS growth over 5 % or leaking descriptors.
# `python benchmarks/soak.py` alone runs 10 minutes.
test-soak: $(VENV)/.installed
	$(BIN)/python benchmarks/soak.py --minutes 1 --check

# The whole suite RUNS times in a row (3 by default; CI runs it once) while stress-ng keeps
# both cores busy (installs stress-ng with apt-get when missing): a failover test that only
# passes on an idle machine has found a bug or has a bound with no margin. Stops at the first
# failed run.
RUNS ?= 3
test-stress: $(VENV)/.installed system-deps
	@command -v stress-ng >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q stress-ng; }
	@stress-ng --cpu 2 --timeout 2h --quiet & hog=$$!; trap "kill $$hog" EXIT; \
	for run in $$(seq 1 $(RUNS)); do \
	  echo "== make test, run $$run of $(RUNS), beside stress-ng --cpu 2"; \
	  $(MAKE) --no-print-directory test || exit 1; done; echo "== $(RUNS) of $(RUNS) runs passed"

# The Dockerfile built by buildah (no Docker engine needed) on a Debian base that debootstrap
# makes, then the image run: non-root, /healthz, HEALTHCHECK, a proxied request, SIGTERM drain.
# Needs root; installs buildah and debootstrap with apt-get when missing (about 3 minutes).
test-container: $(VENV)/.installed
	@missing=""; for tool in buildah debootstrap; do \
	  command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q $$missing || echo "could not install$$missing: skipping"; fi
	FAILOVER_PROXY_CONTAINER_TEST=1 $(BIN)/pytest -q -rs -s tests/test_container.py

# Installs nginx, haproxy, wrk and hey with apt-get when missing; failover-proxy against nginx
# and HAProxy (1 worker and all cores, small and 64 KiB bodies, 64 and 256 connections, latency
# at a fixed rate, memory with 10k idle connections and a 1 GiB stream); then a provider broken
# in every fault mode under load. Tables go to benchmarks/results/ (about 20 minutes).
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/tls.py
	$(BIN)/python benchmarks/failover.py
	$(BIN)/python benchmarks/http2.py

# Instructions per proxied request under callgrind (installs valgrind): steady enough to show a
# hot-path change of a few percent, which throughput on a shared machine cannot.
bench-instructions: $(VENV)/.installed
	$(BIN)/python benchmarks/instructions.py
	$(BIN)/python benchmarks/instructions.py --browser-headers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
