//! The library behind the `medai` command, shared with the whole-mesh tests so that tests
//! start the mesh exactly as `medai up` does.

pub mod client;
pub mod exit;
pub mod images;
pub mod launcher;
pub mod output;
pub mod session;
