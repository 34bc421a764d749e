//! The `socket:` destination: a backup kept by `backup-cli server` on another machine,
//! reached over the Noise transport of `net` (wire format in `net::transport` and
//! `net::message`), directly or through a SOCKS5 proxy (Tor).
//!
//! - `client`: `SocketDestination`, the seam's synchronous calls over its own runtime.
//! - `cli`: `backup-cli init|restore|verify socket:...`.

pub mod client;
pub mod node;
pub mod seam;

pub use client::{SocketDestination, SocketError};
