//! The shared half of the real-guest test: the deterministic data plan
//! (which byte goes where) and the console line format.
//!
//! The `blkmesh-guest-check` binary runs inside a Linux guest whose disk is a
//! blkmesh export and writes the plan's patterns through the guest kernel's
//! virtio-blk driver. After the guest powered off, the host test checks the
//! backing image with the same [`plan::Plan`], so both sides agree on every
//! byte without shipping data between them: a write the guest believed done
//! but that never reached the image, or one that landed at the wrong offset,
//! shows up on the host as well as in the guest.
//!
//! The guest reports on its serial console, one line per fact (see
//! [`report`]); the host parses the console text with
//! [`report::Report::parse`]. The in-guest benchmark's workloads and result
//! lines are in [`workload`].

pub mod plan;
pub mod report;
pub mod workload;
