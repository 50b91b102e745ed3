//! The library behind the `medai` command, shared with the whole-mesh tests so that tests
//! start the mesh exactly as `medai up` does.

pub mod client;
pub mod launcher;
