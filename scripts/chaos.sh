#!/usr/bin/env bash
# The chaos run, larger than the test suite's: N MQTT jobs at QoS 1 (default
# 5000) while mosquitto is restarted twice and the daemon SIGKILLed twice, with
# socket clients asking all along. Prints the report: jobs sent, answered,
# lost (must be 0), duplicates, and how the socket clients fared.
#   scripts/chaos.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
CHAOS_JOBS="${1:-5000}" cargo test --locked --test chaos -- --nocapture 2>&1 \
  | grep -E "chaos report|test result|panicked|lost jobs"
