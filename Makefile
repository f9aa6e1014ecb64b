# Wrenn: build, image, test and run. Everything here runs as root on Debian 12.
#
#   make run     start a node, create a sandbox, run Python in it (the main job)
#   make test    install what is missing, build, make the image, run every test
#   make bench   sandbox lifecycle, SDK, fleet gossip and forwarding timings, written to
#                target/bench/*.md
#   make image   build the base guest image into $(IMAGE_DIR), and the
#                templates of $(TEMPLATES) into sibling folders
#   make lint    rustfmt and clippy, warnings are errors

CARGO ?= cargo
IMAGE_DIR ?= /var/lib/wrenn/images/base
IMAGE_CACHE ?= /var/lib/wrenn/cache/image
# Templates built on top of base, each into $(dir $(IMAGE_DIR))NAME (docs/image.md).
TEMPLATES ?= code-runner-beta
HOST_TARGET := x86_64-unknown-linux-gnu
ENVD_BIN := target/release/envd
# wrenn-init is PID 1 in the initramfs, where there is no libc: link it statically.
INIT_BIN := target/static/$(HOST_TARGET)/release/wrenn-init

export WRENN_IMAGE_DIR := $(IMAGE_DIR)
export WRENN_IMAGE_CACHE := $(IMAGE_CACHE)

.PHONY: all deps build image test bench run lint fmt clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=false \
		CARGO_PROFILE_RELEASE_STRIP=symbols $(CARGO) build --release -p wrenn-init \
		--target $(HOST_TARGET) --target-dir target/static

image: build
	image/build-guest.sh --envd $(ENVD_BIN) --init $(INIT_BIN)
	set -e; for t in $(TEMPLATES); do \
		image/build-guest.sh --envd $(ENVD_BIN) --init $(INIT_BIN) --template $$t; \
	done

test: image
	WRENN_E2E=1 $(CARGO) test --release --workspace

bench: image
	WRENN_E2E=1 $(CARGO) bench -p wrenn-agent --bench lifecycle
	WRENN_E2E=1 $(CARGO) bench -p wrenn-agent --bench sdk
	WRENN_E2E=1 $(CARGO) bench -p wrenn-agent --bench fleet
	WRENN_E2E=1 $(CARGO) bench -p wrenn-agent --bench forwarding
	$(CARGO) bench -p wrenn-vmm --bench vmm

run: image
	WRENN_IMAGES_DIR=$(dir $(IMAGE_DIR)) scripts/run-node.sh target/release/wrenn-agent

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
