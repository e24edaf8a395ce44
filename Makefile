# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv from nothing when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format clean-venv browser

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build that lies on this disk. A looser
	# requirement pulled in later would fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# lmms-eval without its declared dependencies (the `lmms` extra above has the ones
	# the serving test uses): its torchvision requirement would not load with CPU torch.
	$(BIN)/pip install -q --no-deps 'lmms-eval==0.7.3'
	touch $@

# The suite (its benchmarks included) runs under the caching allocator that the
# entry points choose for themselves (neva_jax/allocator.py; NEVA_JAX_ALLOCATOR=system opts out).
test: $(BIN)/.installed browser
	$(BIN)/python -m ruff check neva_jax tests configs
	allocator_env=$$($(BIN)/python -m neva_jax.allocator --env) || exit 2; \
	eval "$$allocator_env"; \
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

# The chat page's browser test drives Debian's chromium through chromium-driver. Installed
# only when missing and apt-get can run (root); elsewhere that one test is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium/chromedriver missing and apt-get unusable: the browser test will be skipped"; fi

# Prints which allocator it runs under (its first line).
demo: $(BIN)/.installed
	$(BIN)/python -m neva_jax.demo

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check neva_jax tests configs
	$(BIN)/python -m ruff format --check neva_jax tests configs

format: $(BIN)/.installed
	$(BIN)/python -m ruff format neva_jax tests configs
	$(BIN)/python -m ruff check --fix neva_jax tests configs

clean-venv:
	rm -rf $(VENV)
