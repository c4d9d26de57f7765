//! The blkmesh processes a sandbox is made for.

use std::fmt;

/// The process a filter is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    /// `blkmesh-manager`: the gRPC control plane.
    Manager,
    /// `blkmesh-frontend`: the vhost-user-blk device server.
    Frontend,
    /// `blkmesh-worker`: executes node graphs with libblkio.
    Worker,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Manager, Kind::Frontend, Kind::Worker];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Manager => "manager",
            Kind::Frontend => "frontend",
            Kind::Worker => "worker",
        })
    }
}
