#!/usr/bin/env bash
# The whole test suite: unit, property, golden and integration tests (the
# integration tests drive the real binary on ext4 and ISO images).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Garage, the S3-compatible store of the bucket tests (once per machine).
scripts/install-garage.sh
# In the release profile, as the demo builds: a fresh machine compiles
# RocksDB (about 11 minutes on 2 cores) once for both, not once per profile.
cargo test --release --workspace --all-targets
