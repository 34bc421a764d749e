//! What the `socket:` client and `backup-cli server` share: the URL syntax (`url`), keys
//! (`identity`), the encrypted channel (`transport`) and the messages in it (`message`).

pub mod identity;
pub mod message;
pub mod transport;
pub mod url;
