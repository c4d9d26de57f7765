//! Where the state lives between runs: the state file ([`mod@file`]) and its
//! one writer, which writes off the manager's lock ([`writer`]).

pub(crate) mod file;
pub(crate) mod writer;
