//! The frontend's registration with the manager: a stream of export plans
//! that the frontend reconciles with the exports it serves. If the manager
//! goes away, running exports keep serving; the frontend re-registers and
//! gets a fresh snapshot when it is back.

use std::collections::HashMap;
use std::time::Duration;

use blkmesh_proto::v1::frontend_event::Event;
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::{ExportPlan, FrontendHello};

use crate::export::ExportServer;

/// How often exports that could not be started are tried again (a worker
/// may not be listening yet, or may be restarting).
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// The exports this frontend serves, by id.
#[derive(Default)]
pub struct Exports {
    servers: HashMap<String, ExportServer>,
    /// Plans that failed to start, retried every [`RETRY_INTERVAL`].
    pending: HashMap<String, ExportPlan>,
}

impl Exports {
    /// Serves `plan`, restarting the export if its plan changed.
    pub fn upsert(&mut self, plan: ExportPlan) {
        let Some(id) = plan.export.as_ref().map(|e| e.id.clone()) else {
            tracing::warn!("manager sent a plan without an export");
            return;
        };
        if self.servers.get(&id).is_some_and(|s| s.plan == plan) {
            return;
        }
        if let Some(server) = self.servers.get_mut(&id) {
            if server.only_placement_changed(&plan) {
                match server.apply_placement(plan.clone()) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::error!(export = %id, "live move failed, restarting the export: {e}")
                    }
                }
            }
        }
        if let Some(old) = self.servers.remove(&id) {
            old.stop();
        }
        self.pending.remove(&id);
        self.start(id, plan, true);
    }

    fn start(&mut self, id: String, plan: ExportPlan, first: bool) {
        match ExportServer::start(plan.clone()) {
            Ok(s) => {
                if !first {
                    tracing::info!(export = %id, "export started after retrying");
                }
                self.servers.insert(id, s);
            }
            Err(e) => {
                if first {
                    tracing::warn!(export = %id, "cannot serve export yet, will retry: {}", crate::error_chain(&e));
                }
                self.pending.insert(id, plan);
            }
        }
    }

    /// Tries the pending exports again.
    pub fn retry_pending(&mut self) {
        let pending: Vec<(String, ExportPlan)> = self.pending.drain().collect();
        for (id, plan) in pending {
            self.start(id, plan, false);
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn remove(&mut self, id: &str) {
        self.pending.remove(id);
        if let Some(s) = self.servers.remove(id) {
            tracing::info!(export = %id, "export removed");
            s.stop();
        }
    }

    /// Keeps only the exports in `ids` (after a fresh snapshot).
    pub fn retain(&mut self, ids: &[String]) {
        let stale: Vec<String> = self
            .servers
            .keys()
            .filter(|k| !ids.contains(k))
            .cloned()
            .collect();
        for id in stale {
            self.remove(&id);
        }
    }

    pub fn stop_all(&mut self) {
        self.pending.clear();
        for (_, s) in self.servers.drain() {
            s.stop();
        }
    }
}

/// Registers with the manager and applies its events until `shutdown`
/// resolves. Export start/stop runs on blocking threads.
pub async fn run(addr: String, name: String, shutdown: impl std::future::Future<Output = ()>) {
    let exports = std::sync::Arc::new(std::sync::Mutex::new(Exports::default()));
    blkmesh_stats::spawn_reporter(
        addr.clone(),
        format!("frontend/{name}"),
        crate::stats().clone(),
    );
    let work = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match session(&addr, &name, &exports).await {
                    Ok(()) => tracing::warn!("manager closed the registration stream"),
                    Err(e) => tracing::warn!("registration with {addr}: {e}"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let retry = {
        let exports = std::sync::Arc::clone(&exports);
        async move {
            let mut tick = tokio::time::interval(RETRY_INTERVAL);
            loop {
                tick.tick().await;
                let ex = std::sync::Arc::clone(&exports);
                let _ = tokio::task::spawn_blocking(move || {
                    let mut ex = ex.lock().unwrap_or_else(|p| p.into_inner());
                    if ex.has_pending() {
                        ex.retry_pending();
                    }
                })
                .await;
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = retry => {}
        _ = shutdown => {}
    }
    let _ = tokio::task::spawn_blocking(move || {
        exports.lock().unwrap_or_else(|p| p.into_inner()).stop_all()
    })
    .await;
}

async fn session(
    addr: &str,
    name: &str,
    exports: &std::sync::Arc<std::sync::Mutex<Exports>>,
) -> Result<(), tonic::Status> {
    let mut client = FrontendServiceClient::connect(addr.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client
        .register(FrontendHello {
            name: name.to_string(),
        })
        .await?
        .into_inner();
    tracing::info!("registered with the manager at {addr}");
    // The snapshot comes first; exports missing from it were removed while
    // we were away. We cannot tell where the snapshot ends, so collect ids
    // until the stream has been quiet briefly.
    let mut snapshot: Option<Vec<String>> = Some(Vec::new());
    loop {
        let next = if snapshot.is_some() {
            match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
                Ok(m) => m?,
                Err(_) => {
                    let ids = snapshot.take().unwrap_or_default();
                    let ex = std::sync::Arc::clone(exports);
                    let _ = tokio::task::spawn_blocking(move || {
                        ex.lock().unwrap_or_else(|p| p.into_inner()).retain(&ids)
                    })
                    .await;
                    continue;
                }
            }
        } else {
            stream.message().await?
        };
        let Some(ev) = next else { return Ok(()) };
        let ex = std::sync::Arc::clone(exports);
        match ev.event {
            Some(Event::Upsert(plan)) => {
                if let (Some(ids), Some(e)) = (snapshot.as_mut(), plan.export.as_ref()) {
                    ids.push(e.id.clone());
                }
                let _ = tokio::task::spawn_blocking(move || {
                    ex.lock().unwrap_or_else(|p| p.into_inner()).upsert(plan)
                })
                .await;
            }
            Some(Event::Remove(id)) => {
                let _ = tokio::task::spawn_blocking(move || {
                    ex.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)
                })
                .await;
            }
            None => {}
        }
    }
}
