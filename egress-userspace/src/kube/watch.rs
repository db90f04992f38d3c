//! The Pods of this node from the API server: list, then watch, with the field selector
//! `spec.nodeName=<node>`, reconnecting with kube-runtime's backoff (0.8 s doubling to 30 s) and
//! re-listing after a gap. Nothing here is on the enforcement path: while the API server is
//! unreachable the kernel goes on enforcing from the pins, and only the pod names in reports
//! are missing or stale.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use ::kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tracing::{info, warn};

use super::pods::{PodIndex, PodInfo};

/// Where the API server is.
#[derive(Debug, Clone, Default)]
pub struct ApiSource {
    /// A kubeconfig file (`--kubeconfig`).
    pub kubeconfig: Option<PathBuf>,
    /// An explicit server URL, no credentials (`--kube-server`; tests).
    pub server: Option<String>,
}

impl ApiSource {
    /// A client: the explicit server, the kubeconfig, else in-cluster (the service account's
    /// token and CA, `KUBERNETES_SERVICE_HOST`) or `$KUBECONFIG` / `~/.kube/config`.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let config = if let Some(url) = &self.server {
            Config::new(
                url.parse()
                    .map_err(|e| anyhow::anyhow!("--kube-server {url}: {e}"))?,
            )
        } else if let Some(path) = &self.kubeconfig {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        } else {
            Config::infer().await?
        };
        Ok(Client::try_from(config)?)
    }
}

/// Errors logged at most this often while the API server stays unreachable.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

/// Keeps `index` in step with the Pods of `node` until the task is dropped; `changed` counts the
/// changes (the generation the controller awaits).
pub async fn run(
    source: ApiSource,
    node: String,
    index: Arc<RwLock<PodIndex>>,
    changed: watch::Sender<u64>,
) {
    let client = loop {
        match source.client().await {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "no Kubernetes client; retrying in 30 s (enforcement goes on without pod names)");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut listing: Option<Vec<PodInfo>> = None;
    let mut last_error: Option<Instant> = None;
    let bump = || changed.send_modify(|g| *g += 1);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(p)) => {
                if let (Some(l), Some(p)) = (&mut listing, PodInfo::from_pod(&p)) {
                    l.push(p);
                }
            }
            Ok(Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                let n = pods.len();
                write(&index).replace_all(pods);
                bump();
                last_error = None;
                info!(node = %node, pods = n, "pods of this node listed; watching");
            }
            Ok(Event::Apply(p)) => {
                if let Some(p) = PodInfo::from_pod(&p) {
                    write(&index).upsert(p);
                    bump();
                }
            }
            Ok(Event::Delete(p)) => {
                if let Some(uid) = p.metadata.uid.as_deref() {
                    write(&index).remove(uid);
                    bump();
                }
            }
            Err(e) => {
                if last_error.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    warn!(error = %e, "watching pods failed; retrying with backoff (enforcement goes on)");
                    last_error = Some(Instant::now());
                }
            }
        }
    }
}

fn write(index: &RwLock<PodIndex>) -> std::sync::RwLockWriteGuard<'_, PodIndex> {
    index.write().unwrap_or_else(|e| e.into_inner())
}
