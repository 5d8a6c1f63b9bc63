#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  bash tools/install-test-deps.sh
else
  sudo -n bash tools/install-test-deps.sh
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Release profile: the end-to-end tests move real bytes through real sockets.
cargo test --workspace --release -- --test-threads="${TEST_THREADS:-2}"
