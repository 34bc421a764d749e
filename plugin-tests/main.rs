//! Integration tests: the real binaries as child processes, real files, real fsync, real
//! SQLite, driven in lightningd's order by the stand-in in `cln_backup::sim`.

mod adapter;
mod common;
mod compaction;
mod crash;
mod damage;
mod legacy;
mod postgres;
mod replay;
mod replicas;
mod sealed;
mod socket;
mod usage;
