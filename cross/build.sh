#!/usr/bin/env bash
# Builds inferd for aarch64 Linux (Jetson, Raspberry Pi 4/5, Graviton) on an
# x86_64 Debian/Ubuntu box, and its arm64 .deb:
#
#   cross/build.sh            → target/aarch64-unknown-linux-gnu/release/inferd
#                               target/aarch64-unknown-linux-gnu/debian/inferd_<version>-1_arm64.deb
#                               target/debian-models/inferd-model-<name>_<version>-1_all.deb (one a model)
#
# The binary is linked against glibc 2.28 symbols with cargo-zigbuild, so it
# runs on JetPack 5 (glibc 2.31), JetPack 6 (2.35) and any distribution since
# 2018 (Debian 10, Ubuntu 20.04); the script checks that floor.
# INFERD_CROSS_PLAIN=1 uses Debian's gcc-aarch64-linux-gnu as linker instead
# (no Python tools needed; the binary then needs the build box's glibc, 2.36 on Debian 12).
#
# Tools it installs when missing: the Rust target (rustup), Debian's
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and cmake (apt; cmake builds
# libjpeg-turbo, whose aarch64 SIMD code is C), cargo-zigbuild and
# ziglang (pinned, from PyPI, into target/cross-tools), cargo-deb (cargo install).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
GLIBC_FLOOR=2.28
ZIGBUILD_VERSION=0.24.0
ZIGLANG_VERSION=0.15.2
CARGO_DEB_VERSION=3.8.0
TOOLS=$PWD/target/cross-tools

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

rustup target list --installed | grep -qx "$TARGET" || { say "adding the Rust target $TARGET"; rustup target add "$TARGET"; }
if ! command -v aarch64-linux-gnu-gcc >/dev/null || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
  say "installing gcc-aarch64-linux-gnu and libc6-dev-arm64-cross"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
command -v cmake >/dev/null || { say "installing cmake"; sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake; }
command -v cargo-deb >/dev/null || { say "installing cargo-deb $CARGO_DEB_VERSION"; cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"; }

if [ "${INFERD_CROSS_PLAIN:-0}" = 1 ]; then
  say "building with aarch64-linux-gnu-gcc (glibc of this box)"
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc cargo build --release --locked --target "$TARGET"
else
  if [ ! -x "$TOOLS/bin/cargo-zigbuild" ]; then
    say "installing cargo-zigbuild $ZIGBUILD_VERSION and ziglang $ZIGLANG_VERSION into $TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q "cargo-zigbuild==$ZIGBUILD_VERSION" "ziglang==$ZIGLANG_VERSION"
  fi
  export PATH=$TOOLS/bin:$PATH
  say "building with cargo-zigbuild for glibc $GLIBC_FLOOR"
  cargo zigbuild --release --locked --target "$TARGET.$GLIBC_FLOOR"
fi

BIN=target/$TARGET/release/inferd
file "$BIN" 2>/dev/null | grep -q 'ARM aarch64' || { echo "cross/build.sh: $BIN is not an aarch64 binary" >&2; exit 1; }
need=$(aarch64-linux-gnu-objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -k3,3n -u | sed 's/GLIBC_//' | sort -V | tail -1)
say "$BIN needs glibc $need or newer"
if [ "${INFERD_CROSS_PLAIN:-0}" != 1 ] && [ "$(printf '%s\n%s\n' "$need" "$GLIBC_FLOOR" | sort -V | tail -1)" != "$GLIBC_FLOOR" ]; then
  echo "cross/build.sh: the binary needs glibc $need, over the floor of $GLIBC_FLOOR" >&2
  exit 1
fi

say "packaging the arm64 .deb (daemon, units, config: no model)"
cargo deb --target "$TARGET" --no-build --no-strip
ls -l target/$TARGET/debian/*.deb
if [ -x target/release/inferd ] || [ -x target/debug/inferd ]; then
  say "packaging each model (Architecture: all) with this box's inferd"
  scripts/package-models.sh --out target/debian-models
fi
