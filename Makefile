# minimesh: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv native pure test test-unit lint demo demo-down images bench binary clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing minimesh with its dev tools"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The hot path compiled with mypyc, next to its sources. Rebuilt when any module of the
# package changes: compiled code checks the types the other modules declare.
NATIVE := build/native/.built
native: $(NATIVE)

$(NATIVE): $(STAMP) tools/native.py $(shell find minimesh -name '*.py')
	@$(BIN)/python tools/native.py || echo "==> the hot path runs as plain Python (slower, same behaviour)"
	@mkdir -p $(dir $(NATIVE)) && touch $(NATIVE)

pure:
	@$(PYTHON) tools/native.py --remove

test: venv native
	@bash compose/engine.sh || echo "==> the Docker tests will say why they cannot run"
	@$(BIN)/pytest -q

test-unit: venv
	@$(BIN)/pytest -q tests/unit

# ruff, mypy, and the layering contract (config, registry <- routing <- dataplane <- daemon <- cli)
lint: venv
	@$(BIN)/ruff check minimesh tests tools
	@$(BIN)/ruff format --check minimesh tests tools
	@$(BIN)/mypy --strict minimesh
	@$(BIN)/pytest -q -p no:cacheprovider tests/unit/test_layering.py

binary: venv native
	@echo "==> building dist/minimesh with PyInstaller"
	@$(BIN)/pyinstaller --log-level WARN --noconfirm --clean --onefile --name minimesh \
		--collect-data minimesh --collect-data celpy --collect-submodules celpy \
		--collect-submodules minimesh $$($(BIN)/python tools/native.py --hidden-imports) \
		--specpath build --workpath build/pyinstaller --distpath dist minimesh/__main__.py
	@dist/minimesh version

images: venv
	@bash compose/images.sh

demo: venv native images
	@bash compose/demo.sh up

demo-down:
	@bash compose/demo.sh down

# Gateway throughput and latency against nginx and the bare upstream, reload latency and a
# py-spy profile, then containers: HTTP and TCP (redis-benchmark, bulk) through the sidecars
# against nginx `stream`, gRPC unary (h2load) against nginx `grpc_pass` (DESIGN.md §5); prints
# tables, writes bench/results.json, ~6 minutes.
bench: venv native
	@test -x $(BIN)/py-spy || { echo "==> installing py-spy into $(VENV) for the profile"; \
		$(BIN)/pip install --quiet py-spy || echo "==> py-spy could not be installed: no profile this time" >&2; }
	@$(BIN)/python bench/run.py
	@$(BIN)/python bench/docker.py
	@$(BIN)/python bench/tcp.py
	@$(BIN)/python bench/grpc.py

clean: pure
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
