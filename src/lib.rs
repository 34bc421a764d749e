//! cln-backup: a crash-safe, continuous backup of Core Lightning's SQLite database.
//!
//! The plugin (`plugin`, on cln-plugin with a pre-init adapter) appends every `db_write` call durably to a journal before it lets
//! lightningd commit; `backup-cli` (`cli`) creates, verifies and restores backups.
//! Storage: `layout` (files of a backup), `journal` (record format), `snapshot`,
//! `writer`, `reader`, `restore`; rules: `versions`; durability: `fsutil`.

pub mod apply;
pub mod cli;
pub mod clock;
pub mod compact;
pub mod destination;
pub mod error;
pub mod fsutil;
pub mod journal;
pub mod keys;
pub mod layout;
pub mod legacy;
pub mod meta;
pub mod migrate;
pub mod net;
pub mod plugin;
pub mod reader;
pub mod restore;
pub mod seal;
pub mod server;
pub mod sim;
pub mod snapshot;
pub mod versions;
pub mod writer;
