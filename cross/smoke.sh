#!/usr/bin/env bash
# Smoke test of the aarch64 build under qemu-user on an x86_64 box:
# `inferd check` on the shipped registry, then one inference on each engine —
# tract, and ONNX Runtime with the aarch64 library of the PyPI wheel.
#
#   cross/build.sh && cross/smoke.sh [path/to/aarch64/inferd]
#
# ONNX Runtime crashes under Debian 12's qemu 7.2 while reading the CPU's
# features; qemu 10 from bookworm-backports runs it. The script fetches that
# qemu-user package with apt into a private state folder and unpacks it into
# target/cross-tools/qemu10 (nothing is installed system-wide). Emulation is
# ~55x slower than native: expect a couple of minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/aarch64-unknown-linux-gnu/release/inferd}
[ -x "$BIN" ] || { echo "cross/smoke.sh: no aarch64 binary at $BIN (run cross/build.sh)" >&2; exit 2; }
QEMU_DIR=$PWD/target/cross-tools/qemu10
QEMU=$QEMU_DIR/usr/bin/qemu-aarch64
SYSROOT=/usr/aarch64-linux-gnu

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ ! -x "$QEMU" ]; then
  say "fetching qemu-user from bookworm-backports into $QEMU_DIR"
  A=$(mktemp -d)
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bookworm-backports main" > "$A/bp.list"
  o=(-o "Dir::Etc::SourceList=$A/bp.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$A/lists"
     -o "Dir::Cache=$A/cache" -o "APT::Architectures::=amd64")
  apt-get "${o[@]}" update -qq
  (cd "$A" && apt-get "${o[@]}" download qemu-user/bookworm-backports)
  mkdir -p "$QEMU_DIR"
  dpkg-deb -x "$A"/qemu-user_*.deb "$QEMU_DIR"
  rm -rf "$A"
fi
"$QEMU" --version | head -1

# The aarch64 ONNX Runtime library (PyPI wheel, pinned): setup.sh puts it where inferd looks.
[ -f runtime/onnxruntime/aarch64/libonnxruntime.so.1.31.1 ] || scripts/setup.sh --arch aarch64

# -E LD_LIBRARY_PATH: with any :arm64 multiarch package installed, threads hang without it (CROSS.md).
run() { "$QEMU" -L "$SYSROOT" -E "LD_LIBRARY_PATH=$SYSROOT/lib" "$BIN" "$@"; }
fail() { echo "cross/smoke.sh: FAILED: $*" >&2; exit 1; }

say "inferd --version"
run --version

say "inferd check (every file, sha256 and spec of the shipped models.json)"
out=$(run check 2>&1) || fail "check: $out"
echo "$out"

say "inferd models (ONNX Runtime found?)"
out=$(run models 2>&1) || fail "models: $out"
echo "$out" | head -3
echo "$out" | grep -q "ONNX Runtime 1.31.1 from .*runtime/onnxruntime/aarch64/" || fail "ONNX Runtime not found: $out"

say "one inference on tract"
out=$(run infer --local --model color --backend tract examples/red.jpg 2>&1) || fail "tract: $out"
echo "$out"
echo "$out" | grep -q "examples/red.jpg: red .*on tract/" || fail "tract did not answer red"

say "one inference on ONNX Runtime"
out=$(run infer --local --model color --backend ort examples/blue.jpg 2>&1) || fail "ort: $out"
echo "$out"
echo "$out" | grep -q "examples/blue.jpg: blue .*on ort/CPUExecutionProvider" || fail "ONNX Runtime did not answer blue"

say "raw tensors on ONNX Runtime: the same numbers as on this x86_64 box (1e-4)"
out=$(run infer --local --model mlp --variant small --json tests/fixtures/mlp-input.json 2>/dev/null) || fail "mlp: $out"
echo "$out" | head -c 300; echo
HOST=target/release/inferd; [ -x "$HOST" ] || HOST=target/debug/inferd
if [ -x "$HOST" ]; then
  ref=$("$HOST" infer --local --model mlp --variant small --json tests/fixtures/mlp-input.json 2>/dev/null)
  python3 - "$out" "$ref" <<'PY' || fail "aarch64 and x86_64 disagree"
import json, sys
a, b = (json.loads(x)["result"]["outputs"]["y"]["data"] for x in sys.argv[1:3])
worst = max(abs(x - y) for x, y in zip(a, b))
print(f"max |aarch64 - x86_64| = {worst:.2e}")
sys.exit(0 if len(a) == len(b) and worst <= 1e-4 else 1)
PY
else
  echo "$out" | grep -q '"shape":\[1,4\]' || fail "mlp output shape"
fi

say "aarch64 smoke test passed"
