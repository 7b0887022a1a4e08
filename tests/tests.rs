//! The integration suite: one test binary, a module per command, driving the
//! real `imgstore` binary on real ext4 and ISO images (built here with
//! `mkfs.ext4 -d`, `debugfs -w` and `xorriso`, no root needed) and the
//! library on a real RocksDB. `conformance` runs the same scenarios through
//! the `Repository` trait on every implementation (memory, local, bucket,
//! remote; plain and encrypted) and compares their answers.

mod util;

mod backup;
mod bucket;
mod conformance;
mod conventions;
mod encryption;
mod errors;
mod faults;
mod fixture;
mod gc;
mod golden;
mod hostile;
mod hostile_server;
mod incremental;
mod integrity;
mod live;
mod mount;
mod records;
mod roundtrip;
mod serve;
mod server;
mod snapshots;
mod vm;
mod wan;
