//! Where the state lives between runs: the state file ([`file`]).

pub(crate) mod file;
