# minimesh: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit lint demo demo-down images bench binary clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing minimesh with its dev tools"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: venv
	@$(BIN)/pytest -q

test-unit: venv
	@$(BIN)/pytest -q tests/unit

lint: venv
	@$(BIN)/ruff check minimesh tests tools
	@$(BIN)/ruff format --check minimesh tests tools
	@$(BIN)/mypy --strict minimesh

binary: venv
	@echo "==> building dist/minimesh with PyInstaller"
	@$(BIN)/pyinstaller --log-level WARN --noconfirm --clean --onefile --name minimesh \
		--collect-data minimesh --collect-data celpy --collect-submodules celpy \
		--specpath build --workpath build/pyinstaller --distpath dist minimesh/__main__.py
	@dist/minimesh version

demo images demo-down bench:
	@echo "make $@: not available yet: the data plane and the Docker demo are still being built (see README.md, 'What works today')" >&2
	@exit 1

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
