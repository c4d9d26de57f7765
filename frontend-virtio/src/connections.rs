//! The VMM connections of an export, each served on a thread of its own.
//!
//! A VMM normally holds one. A VM being migrated holds two for a while:
//! the destination QEMU connects (`-incoming`) and sets up its device
//! while the source's rings still run, and starts its rings only after
//! the source stopped its own (GET_VRING_BASE drains them). Each
//! connection has its own device state (features, memory table, vrings,
//! dirty log); [`QueueOwner`] lets one at a time run the export's queues,
//! and that one is what live changes (reopens, moves, a lost worker's
//! queues) act on ([`Connections::current`]).

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::handler::DeviceHandler;
use crate::queues::owner::QueueOwner;
use crate::queues::WorkerQueues;

/// A VMM connection's device: the vhost-user handler on worker queues.
pub type BlkDevice = DeviceHandler<WorkerQueues>;

struct Conn {
    device: Arc<Mutex<BlkDevice>>,
    /// The socket, to end the connection when the export stops.
    stream: UnixStream,
    /// The VMM's back-end request channel, if it gave one.
    backend: Option<UnixStream>,
}

/// An export's VMM connections.
#[derive(Default)]
pub struct Connections {
    conns: Mutex<(u64, BTreeMap<u64, Conn>)>,
    owner: Arc<QueueOwner>,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, (u64, BTreeMap<u64, Conn>)> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who may run the queues (for the connections' [`WorkerQueues`]).
    pub fn owner(&self) -> Arc<QueueOwner> {
        Arc::clone(&self.owner)
    }

    /// A new connection's id, before its device exists.
    pub fn next_id(&self) -> u64 {
        let mut g = self.lock();
        g.0 += 1;
        g.0
    }

    /// Connection `id` is served.
    pub fn add(&self, id: u64, device: Arc<Mutex<BlkDevice>>, stream: UnixStream) {
        let conn = Conn {
            device,
            stream,
            backend: None,
        };
        self.lock().1.insert(id, conn);
    }

    /// Connection `id`'s VMM gave its back-end request channel.
    pub fn set_backend(&self, id: u64, chan: UnixStream) {
        if let Some(c) = self.lock().1.get_mut(&id) {
            c.backend = Some(chan);
        }
    }

    /// Connection `id` ended.
    pub fn remove(&self, id: u64) {
        self.lock().1.remove(&id);
        self.owner.release(id);
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.lock().1.len()
    }

    fn current_id(&self, conns: &BTreeMap<u64, Conn>) -> Option<u64> {
        self.owner
            .active()
            .filter(|id| conns.contains_key(id))
            .or_else(|| conns.keys().next_back().copied())
    }

    /// The device live changes act on: the connection running the queues,
    /// else the newest.
    pub fn current(&self) -> Option<Arc<Mutex<BlkDevice>>> {
        let g = self.lock();
        let id = self.current_id(&g.1)?;
        g.1.get(&id).map(|c| Arc::clone(&c.device))
    }

    /// The back-end channel of [`Connections::current`]'s VMM, to tell it
    /// of a config change.
    pub fn backend(&self) -> Option<UnixStream> {
        let g = self.lock();
        let id = self.current_id(&g.1)?;
        g.1.get(&id)
            .and_then(|c| c.backend.as_ref())
            .and_then(|b| b.try_clone().ok())
    }

    /// Ends every connection (the export stops).
    pub fn shutdown_all(&self) {
        for c in self.lock().1.values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}
