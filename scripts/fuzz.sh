#!/usr/bin/env bash
# Fuzzes every parser that sees untrusted bytes (fuzz/fuzz_targets/): a short
# smoke by default, or N executions per target:
#   scripts/fuzz.sh            # 20 000 runs each
#   scripts/fuzz.sh 1000000    # the real run
#   scripts/fuzz.sh 1000000 image_decode
#   FUZZ_SECONDS=3600 scripts/fuzz.sh 1000000000 image_decode   # an hour
# Needs the nightly toolchain and cargo-fuzz (installed here if missing).
# New inputs go to fuzz/corpus/<target> (not in git); fuzz/seeds/<target> is
# the small seed corpus kept in git. A crash leaves its input in
# fuzz/artifacts/<target>: fix it and add it to a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20000}"
targets=("${@:2}")
[ ${#targets[@]} -gt 0 ] || targets=(registry api_request mqtt_envelope image_decode prompt config schema)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# libjpeg-turbo (C, built by cmake) is compiled with clang, AddressSanitizer and
# libFuzzer's coverage, so the fuzzer sees and checks the decoder itself.
export CC=clang CFLAGS="-fsanitize=address,fuzzer-no-link"
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  seeds=("fuzz/seeds/$target")
  [ "$target" != image_decode ] || seeds+=(tests/fixtures/jpeg tests/fixtures/png tests/fixtures/orientation)
  echo "== $target: $runs runs"
  cargo +nightly fuzz run -O "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
    -runs="$runs" -max_total_time="${FUZZ_SECONDS:-0}" -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|Done|INFO: Loaded)" || true
  if find "fuzz/artifacts/$target" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' -o -name 'timeout-*' \) 2>/dev/null | grep -q .; then
    echo "$target: findings in fuzz/artifacts/$target" >&2
    exit 1
  fi
done
