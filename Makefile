# stockade: `make demo` shows the kernel fast path; `make test` runs every test.
# Both bootstrap the host first (apt packages, kernel headers, venv); run as root.

VENV := .venv
PY := $(VENV)/bin/python
# Two workers, a test file per worker at a time: most of the suite waits on sockets,
# processes and kernels, not on the CPU.
# Tests marked serial then run in one process. PYTEST_ARGS= runs everything in one.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: bootstrap demo test lint typecheck check bench clean install uninstall

bootstrap:
	./scripts/bootstrap

demo: bootstrap
	$(PY) -m stockade.lab.demo

test: bootstrap
	$(VENV)/bin/ruff check .
	./scripts/typecheck
	@# pytest exits 5 when it collected nothing: that is a failure too.
	$(PY) -m pytest $(PYTEST_ARGS) $(if $(PYTEST_ARGS),-m "not serial"); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'make test: pytest collected no tests' >&2; exit 1; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	if [ -n "$(PYTEST_ARGS)" ]; then $(PY) -m pytest -m serial; fi

lint: bootstrap
	$(VENV)/bin/ruff check .

typecheck: bootstrap
	./scripts/typecheck

bench: bootstrap
	$(PY) -m bench.run

# An edge host: /opt/stockade, /etc/stockade, systemd units (docs/install.md).
# DESTDIR=DIR installs under a staging root; PURGE=1 also removes config and state.
install:
	DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' ./scripts/install

uninstall:
	DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' PURGE='$(PURGE)' ./scripts/uninstall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
