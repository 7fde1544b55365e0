#!/usr/bin/env bash
# Packages ONNX Runtime's CPU library from the PyPI wheel (what setup.sh
# fetches, pinned and sha256-checked) as its own .deb, installed where
# inferd looks without configuration: /usr/lib/inferd/onnxruntime/.
#
#   scripts/package-onnxruntime.sh [--arch x86_64|aarch64]
#     → target/debian/inferd-onnxruntime_1.31.1_<amd64|arm64>.deb
#
# On a Jetson, use JetPack's GPU build of ONNX Runtime instead (docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=$(uname -m)
[ "${1:-}" = "--arch" ] && ARCH=$2
case "$ARCH" in
  x86_64|amd64) ARCH=x86_64; DEB_ARCH=amd64 ;;
  aarch64|arm64) ARCH=aarch64; DEB_ARCH=arm64 ;;
  *) echo "package-onnxruntime.sh: unknown arch '$ARCH'" >&2; exit 2 ;;
esac
VERSION=1.31.1
LIB=runtime/onnxruntime/$ARCH/libonnxruntime.so.$VERSION
[ -f "$LIB" ] || scripts/setup.sh --arch "$ARCH"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
install -D -m 644 "$LIB" "$STAGE/usr/lib/inferd/onnxruntime/libonnxruntime.so.$VERSION"
install -d "$STAGE/DEBIAN"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: inferd-onnxruntime
Version: $VERSION
Architecture: $DEB_ARCH
Section: libs
Priority: optional
Maintainer: The inferd developers <inferd@localhost>
Depends: libc6 (>= 2.28)
Enhances: inferd
Description: ONNX Runtime $VERSION (CPU) for inferd
 The libonnxruntime.so.$VERSION of the onnxruntime==$VERSION wheel from PyPI
 (MIT licensed), installed in /usr/lib/inferd/onnxruntime/ where inferd finds
 it without configuration.
CONTROL
mkdir -p target/debian
dpkg-deb --root-owner-group --build "$STAGE" "target/debian/inferd-onnxruntime_${VERSION}_${DEB_ARCH}.deb"
