#!/usr/bin/env bash
# The whole test suite: unit, property, golden and integration tests (the
# integration tests drive the real binary on ext4 and ISO images).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --all-targets
