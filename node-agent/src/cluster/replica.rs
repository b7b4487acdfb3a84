//! The ModelReplicas bound to this node: the watch, the table of what the agent works on, and
//! one worker task per replica (pull → memory check → load → Ready → unload on deletion).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::conventions::{AGENT_MANAGER, reason};
use crds::local_model::ModelFormat;
use crds::model_replica::{ModelReplica, ModelReplicaSpec, ModelReplicaStatus, ReplicaPhase};
use crds::source::ModelSource;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Agent;
use super::inventory::{Charge, Device, pick_device};
use super::status::{self, Facts, Failure, Stage, Throttle};
use crate::engine::gguf;
use crate::engine::types::LoadSpec;
use crate::engine::{EngineError, SUPPORTED_GGUF_ARCHITECTURES};
use crate::metrics::DropTimer;
use crate::puller::{PullProgress, PullStage};

/// Progress is written at most this often while pulling.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Bytes per KV-cache element: the engine runs with F32 activations.
const KV_BYTES_PER_ELEM: u64 = 4;

/// Sequences generated at once when the spec does not say (as in `serve`).
const DEFAULT_MAX_SEQS: usize = 4;

/// A replica's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Key {
    pub fn of(mr: &ModelReplica) -> Option<Key> {
        Some(Key {
            namespace: mr.metadata.namespace.clone()?,
            name: mr.metadata.name.clone()?,
        })
    }
}

/// One replica the agent knows of.
#[derive(Debug)]
struct Entry {
    incarnation: u64,
    uid: Option<String>,
    spec: ModelReplicaSpec,
    /// Deleted (or gone from a relist): its worker unloads and removes the entry.
    deleting: bool,
    cancel: CancellationToken,
    /// Becomes true when its worker has finished (and unloaded).
    done: watch::Receiver<bool>,
}

/// What to do after a watch event.
#[derive(Debug)]
pub enum Action {
    /// Nothing new (e.g. the agent's own status write came back).
    Ignore,
    /// Start a worker for this replica.
    Start(Ticket),
}

/// What a new worker needs: its identity, its cancel token, where to say it is done, and the
/// workers it must wait for (an older copy of the same replica, or a replica with the same
/// served name still unloading).
#[derive(Debug)]
pub struct Ticket {
    pub key: Key,
    pub incarnation: u64,
    pub cancel: CancellationToken,
    pub done: watch::Sender<bool>,
    pub predecessors: Vec<watch::Receiver<bool>>,
}

/// The replicas bound to this node and what they hold: memory charges, loaded models and
/// served names. Every change happens under one lock, in one step.
#[derive(Debug, Default)]
pub struct ReplicaTable {
    entries: HashMap<Key, Entry>,
    next: u64,
    /// Incarnation → memory it holds.
    charges: HashMap<u64, Charge>,
    /// Incarnation → `NAMESPACE/NAME` of a loaded replica.
    loaded: HashMap<u64, String>,
    /// Served name → (incarnation, replica) claiming it.
    names: HashMap<String, (u64, Key)>,
    /// Incarnation → done signal of every running worker (including replaced ones).
    workers: HashMap<u64, watch::Receiver<bool>>,
}

fn finished() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(true);
    drop(tx);
    rx
}

impl ReplicaTable {
    /// Decides what a watched replica means. `shutdown` is the parent of every worker's token.
    pub fn apply(&mut self, mr: &ModelReplica, node: &str, shutdown: &CancellationToken) -> Action {
        let Some(key) = Key::of(mr) else {
            return Action::Ignore;
        };
        if mr.spec.node_name != node || mr.metadata.deletion_timestamp.is_some() {
            self.delete(&key);
            return Action::Ignore;
        }
        let uid = mr.metadata.uid.clone();
        let mut predecessors = Vec::new();
        if let Some(e) = self.entries.get(&key) {
            if e.uid == uid && e.spec == mr.spec && !e.deleting {
                return Action::Ignore;
            }
            // Another object under the same name, or a new spec: the old worker stops and
            // unloads first.
            e.cancel.cancel();
            predecessors.push(e.done.clone());
        } else if let Some(st) = &mr.status {
            // Failed for this very spec before the agent (re)started: the operator deletes
            // and re-places it; trying again here would only fail again.
            if st.phase == Some(ReplicaPhase::Failed)
                && st.observed_generation.is_some()
                && st.observed_generation == mr.metadata.generation
            {
                self.next += 1;
                self.entries.insert(
                    key,
                    Entry {
                        incarnation: self.next,
                        uid,
                        spec: mr.spec.clone(),
                        deleting: false,
                        cancel: CancellationToken::new(),
                        done: finished(),
                    },
                );
                return Action::Ignore;
            }
        }
        // A replica with the same served name still unloading must be gone before this loads.
        for (k, e) in &self.entries {
            if *k != key && e.deleting && e.spec.served_name == mr.spec.served_name {
                predecessors.push(e.done.clone());
            }
        }
        self.next += 1;
        let incarnation = self.next;
        let cancel = shutdown.child_token();
        let (done_tx, done_rx) = watch::channel(false);
        self.workers.insert(incarnation, done_rx.clone());
        self.entries.insert(
            key.clone(),
            Entry {
                incarnation,
                uid,
                spec: mr.spec.clone(),
                deleting: false,
                cancel: cancel.clone(),
                done: done_rx,
            },
        );
        Action::Start(Ticket {
            key,
            incarnation,
            cancel,
            done: done_tx,
            predecessors,
        })
    }

    /// The replica was deleted: a finished (failed) one is forgotten at once, a running one is
    /// told to stop and unload.
    pub fn delete(&mut self, key: &Key) -> bool {
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if *e.done.borrow() {
            self.entries.remove(key);
        } else {
            e.deleting = true;
            e.cancel.cancel();
        }
        true
    }

    /// After a relist: replicas not listed any more were deleted while the watch was down.
    pub fn retain_listed(&mut self, listed: &HashSet<Key>) -> Vec<Key> {
        let gone: Vec<Key> = self
            .entries
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        for k in &gone {
            self.delete(k);
        }
        gone
    }

    /// Claims `served_name` for a replica. `Err(holder)` when another replica holds it.
    pub fn claim_name(
        &mut self,
        served_name: &str,
        incarnation: u64,
        key: &Key,
    ) -> Result<(), Key> {
        match self.names.get(served_name) {
            Some((inc, holder)) if *inc != incarnation => Err(holder.clone()),
            _ => {
                self.names
                    .insert(served_name.to_string(), (incarnation, key.clone()));
                Ok(())
            }
        }
    }

    pub fn add_charge(&mut self, incarnation: u64, charge: Charge) {
        self.charges.insert(incarnation, charge);
    }

    /// The replica is loaded: its charge now shows in measured readings, and it is listed.
    pub fn mark_loaded(&mut self, incarnation: u64, key: &Key) {
        if let Some(c) = self.charges.get_mut(&incarnation) {
            c.loaded = true;
        }
        self.loaded.insert(incarnation, key.to_string());
    }

    /// The worker ended: drop what it held. Its entry goes if it was deleted; otherwise the
    /// replica failed and its entry stays, so the same spec is not tried again.
    pub fn finish(&mut self, key: &Key, incarnation: u64) {
        self.charges.remove(&incarnation);
        self.loaded.remove(&incarnation);
        self.names.retain(|_, (inc, _)| *inc != incarnation);
        self.workers.remove(&incarnation);
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.incarnation == incarnation && e.deleting)
        {
            self.entries.remove(key);
        }
    }

    pub fn charges(&self) -> impl Iterator<Item = &Charge> {
        self.charges.values()
    }

    /// `NAMESPACE/NAME` of every loaded replica, sorted.
    pub fn loaded_replicas(&self) -> Vec<String> {
        let mut v: Vec<String> = self.loaded.values().cloned().collect();
        v.sort();
        v
    }

    /// Done signals of every running worker.
    pub fn all_done(&self) -> Vec<watch::Receiver<bool>> {
        self.workers.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The context the engine will serve: the spec's, capped at what the model was trained for;
/// else the trained context; else 2048 (as the engine host decides).
pub fn served_context(asked: Option<usize>, trained: Option<usize>) -> usize {
    match (asked, trained) {
        (Some(a), Some(max)) if a > max => max,
        (Some(a), _) => a,
        (None, Some(max)) => max,
        (None, None) => 2048,
    }
}

/// Watches the ModelReplicas bound to this node until `stop`.
pub async fn watch_replicas(agent: Arc<Agent>, stop: CancellationToken) {
    let api: Api<ModelReplica> = Api::all(agent.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.node));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut relist: Option<HashSet<Key>> = None;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            ev = stream.next() => ev,
        };
        match event {
            None => {
                tracing::error!("the ModelReplica watch ended");
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching ModelReplicas failed; retrying");
            }
            Some(Ok(Event::Init)) => relist = Some(HashSet::new()),
            Some(Ok(Event::InitApply(mr))) => {
                if let (Some(seen), Some(k)) = (relist.as_mut(), Key::of(&mr)) {
                    seen.insert(k);
                }
                on_apply(&agent, mr);
            }
            Some(Ok(Event::InitDone)) => {
                if let Some(seen) = relist.take() {
                    let gone = agent.table().retain_listed(&seen);
                    for k in gone {
                        tracing::info!(replica = %k, "replica no longer bound to this node; unloading");
                    }
                    tracing::info!(node = %agent.node, replicas = seen.len(), "watching the ModelReplicas bound to this node");
                }
            }
            Some(Ok(Event::Apply(mr))) => on_apply(&agent, mr),
            Some(Ok(Event::Delete(mr))) => {
                if let Some(k) = Key::of(&mr)
                    && agent.table().delete(&k)
                {
                    tracing::info!(replica = %k, "replica deleted; unloading once in-flight requests finish");
                }
            }
        }
    }
}

fn on_apply(agent: &Arc<Agent>, mr: ModelReplica) {
    let action = agent.table().apply(&mr, &agent.node, &agent.shutdown);
    if let Action::Start(ticket) = action {
        tracing::info!(replica = %ticket.key, model = %mr.spec.model, served_name = %mr.spec.served_name,
            source = %mr.spec.source, "replica bound to this node");
        let agent = agent.clone();
        tokio::spawn(async move { worker(agent, mr, ticket).await });
    }
}

/// Why a worker stopped before Ready.
enum Stop {
    /// Deleted, replaced or shutting down.
    Cancelled,
    /// Cannot run; `weights_ready` when the weights were pulled before.
    Failed(Failure, bool),
}

/// What a worker holds and must give back.
#[derive(Default)]
struct Held {
    /// The digest pinned in the cache.
    pinned: Option<String>,
    /// The served name loaded in the engine.
    loaded: Option<String>,
}

/// Writes one replica's status by server-side apply, only when it changed.
struct StatusWriter {
    api: Api<ModelReplica>,
    key: Key,
    last: Option<ModelReplicaStatus>,
}

impl StatusWriter {
    /// Builds the status of `stage` and writes it when it differs from the last one. `Ok(false)`:
    /// nothing to write.
    async fn write(&mut self, stage: &Stage, facts: &Facts) -> Result<bool, kube::Error> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let next = status::build(self.last.as_ref(), stage, facts, &now);
        if !status::changed(self.last.as_ref(), &next) {
            return Ok(false);
        }
        let body = serde_json::json!({
            "apiVersion": crds::API_VERSION,
            "kind": "ModelReplica",
            "metadata": { "name": self.key.name, "namespace": self.key.namespace },
            "status": next,
        });
        self.api
            .patch_status(
                &self.key.name,
                &PatchParams::apply(AGENT_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        self.last = Some(next);
        Ok(true)
    }

    /// Writes once; a failure is logged (the next stage writes again).
    async fn write_logged(&mut self, stage: &Stage, facts: &Facts) {
        if let Err(e) = self.write(stage, facts).await {
            tracing::warn!(replica = %self.key, error = %e, "writing the replica status failed");
        }
    }

    /// Writes a lasting state (Ready, Failed), retrying with backoff until it lands, the object
    /// is gone, or `cancel`.
    async fn write_lasting(&mut self, stage: &Stage, facts: &Facts, cancel: &CancellationToken) {
        let mut wait = Duration::from_secs(1);
        loop {
            match self.write(stage, facts).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    tracing::warn!(replica = %self.key, error = %e, "writing the replica status failed; retrying");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

async fn worker(agent: Arc<Agent>, mr: ModelReplica, ticket: Ticket) {
    let Ticket {
        key,
        incarnation,
        cancel,
        done,
        predecessors,
    } = ticket;
    let mut waited = true;
    for mut p in predecessors {
        tokio::select! {
            _ = p.wait_for(|d| *d) => {}
            () = cancel.cancelled() => { waited = false; break; }
        }
    }
    let mut held = Held::default();
    if waited {
        let mut writer = StatusWriter {
            api: Api::namespaced(agent.client.clone(), &key.namespace),
            key: key.clone(),
            last: mr.status.clone(),
        };
        let mut facts = Facts {
            generation: mr.metadata.generation,
            served_name: mr.spec.served_name.clone(),
            ..Default::default()
        };
        let result = bring_up(
            &agent,
            &mr,
            &key,
            incarnation,
            &cancel,
            &mut writer,
            &mut held,
            &mut facts,
        )
        .await;
        match result {
            Ok(()) => {
                cancel.cancelled().await;
                if agent.shutdown.is_cancelled() {
                    let write = writer.write(&Stage::Terminating, &facts);
                    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(3), write).await {
                        tracing::debug!(replica = %key, error = %e, "Terminating status not written");
                    }
                }
            }
            Err(Stop::Cancelled) => {
                tracing::info!(replica = %key, "stopped before it was ready");
            }
            Err(Stop::Failed(failure, weights_ready)) => {
                tracing::warn!(replica = %key, reason = failure.reason, message = %failure.message, "replica failed");
                let stage = Stage::Failed {
                    failure,
                    weights_ready,
                };
                writer.write_lasting(&stage, &facts, &cancel).await;
            }
        }
    }
    if let Some(name) = held.loaded.take() {
        match agent.engine.unload(&name).await {
            Ok(()) => agent.metrics.models_loaded.dec(),
            Err(e) => tracing::warn!(replica = %key, error = %e, "unloading failed"),
        }
    }
    if let Some(digest) = held.pinned.take() {
        agent.puller.cache().unpin(&digest);
    }
    agent.table().finish(&key, incarnation);
    let _ = done.send(true);
    agent.node_dirty.notify_one();
}

#[allow(clippy::too_many_arguments)]
async fn bring_up(
    agent: &Agent,
    mr: &ModelReplica,
    key: &Key,
    incarnation: u64,
    cancel: &CancellationToken,
    writer: &mut StatusWriter,
    held: &mut Held,
    facts: &mut Facts,
) -> Result<(), Stop> {
    let spec = &mr.spec;
    let served = spec.served_name.clone();
    if spec.format == ModelFormat::Safetensors {
        return Err(Stop::Failed(
            Failure::new(
                reason::UNSUPPORTED_ARCHITECTURE,
                "format safetensors is not supported by this agent yet; use a GGUF file",
            ),
            false,
        ));
    }
    let source: ModelSource = spec.source.parse().map_err(|e| {
        Stop::Failed(
            Failure::new(
                reason::SOURCE_NOT_FOUND,
                format!("invalid source {:?}: {e}", spec.source),
            ),
            false,
        )
    })?;
    if let Err(holder) = agent.table().claim_name(&served, incarnation, key) {
        return Err(Stop::Failed(
            Failure::new(
                reason::SERVED_NAME_CONFLICT,
                format!(
                    "replica {holder} on node {} already serves the name `{served}`; give the LocalModels different servedNames",
                    agent.node
                ),
            ),
            false,
        ));
    }

    // Pull, with progress written at most every PROGRESS_EVERY.
    let mut throttle = Throttle::new(PROGRESS_EVERY);
    writer.write_logged(&Stage::Pulling(None), facts).await;
    throttle.mark(Instant::now());
    let (tx, mut rx) = watch::channel(PullProgress::default());
    let blob = {
        let pull = agent.puller.pull(&source, spec.sha256.as_deref(), &tx);
        tokio::pin!(pull);
        let mut progress_open = true;
        loop {
            tokio::select! {
                r = &mut pull => break r,
                changed = rx.changed(), if progress_open => {
                    if changed.is_err() {
                        progress_open = false;
                        continue;
                    }
                    let p = rx.borrow_and_update().clone();
                    if p.stage == PullStage::Downloading && throttle.ready(Instant::now()) {
                        let progress = status::progress(&p);
                        tracing::info!(replica = %key, bytes = progress.bytes, total = ?progress.total,
                            percent = ?progress.percent, eta_seconds = ?progress.eta_seconds, "pulling");
                        writer.write_logged(&Stage::Pulling(Some(progress)), facts).await;
                    }
                }
                () = cancel.cancelled() => return Err(Stop::Cancelled),
            }
        }
    };
    let blob = blob.map_err(|e| Stop::Failed(status::pull_failure(&spec.source, &e), false))?;
    let digest = blob.meta.sha256.clone();
    agent.puller.cache().pin(&digest);
    held.pinned = Some(digest.clone());
    facts.digest = Some(digest.clone());
    agent.node_dirty.notify_one();
    if cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }

    // What the weights need.
    let header = {
        let path = blob.path.clone();
        tokio::task::spawn_blocking(move || gguf::read_header(&path))
            .await
            .map_err(|e| {
                Stop::Failed(
                    Failure::new(reason::LOAD_FAILED, format!("reading the header: {e}")),
                    true,
                )
            })?
            .map_err(|e| Stop::Failed(status::engine_failure(&e), true))?
    };
    if !SUPPORTED_GGUF_ARCHITECTURES.contains(&header.architecture.as_str()) {
        let e = EngineError::UnsupportedArchitecture(header.architecture.clone());
        return Err(Stop::Failed(status::engine_failure(&e), true));
    }
    let engine_spec = spec.engine.clone().unwrap_or_default();
    let context = served_context(
        engine_spec.context_length.map(|c| c as usize),
        header.context_length,
    );
    let seqs = engine_spec
        .max_concurrent_sequences
        .map(|c| c as usize)
        .unwrap_or(DEFAULT_MAX_SEQS)
        .max(1);
    let estimate = gguf::estimate_memory(&header, context, seqs, KV_BYTES_PER_ELEM);
    facts.estimate_bytes = Some(estimate);

    // Memory check and charge, in one step under the table lock.
    let snapshot = agent.inventory.snapshot();
    let device = {
        let mut table = agent.table();
        let charges: Vec<&Charge> = table.charges().collect();
        let free = snapshot.admission_free(&charges);
        match pick_device(&free, estimate) {
            Ok(device) => {
                let reserved = spec
                    .memory_reservation_bytes
                    .and_then(|b| u64::try_from(b).ok())
                    .unwrap_or(0);
                table.add_charge(
                    incarnation,
                    Charge {
                        device,
                        bytes: estimate.max(reserved),
                        loaded: false,
                    },
                );
                tracing::info!(replica = %key, %device, estimate, "memory reserved");
                device
            }
            Err((device, free)) => {
                let message = format!(
                    "the model needs about {} (weights {} + KV cache for {context} tokens x {seqs} sequences + overhead) but the most free memory on node {} is {} ({device})",
                    status::human(estimate),
                    status::human(header.weights_bytes),
                    agent.node,
                    status::human(free),
                );
                return Err(Stop::Failed(
                    Failure::new(reason::OUT_OF_MEMORY, message),
                    true,
                ));
            }
        }
    };
    if cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }

    // Load.
    writer.write_logged(&Stage::Loading, facts).await;
    let load = LoadSpec {
        name: served.clone(),
        path: blob.path.clone(),
        sha256: digest,
        context_length: engine_spec.context_length.map(|c| c as usize),
        max_seqs: seqs,
        prefix_cache: engine_spec.prefix_cache.unwrap_or(true),
        chat_template: engine_spec.chat_template.clone(),
        // The GPU the memory was reserved on (builds without CUDA run on the CPU anyway).
        gpu: match device {
            Device::Gpu(i) => Some(i),
            Device::Cpu => None,
        },
    };
    tracing::info!(replica = %key, model = %served, path = %blob.path.display(), "loading");
    let timer = DropTimer::new(
        agent
            .metrics
            .load_seconds
            .with_label_values(&[served.as_str()]),
    );
    let loaded = match agent.engine.load(load).await {
        Ok(l) => {
            drop(timer);
            l
        }
        Err(e) => {
            timer.discard();
            return Err(Stop::Failed(status::engine_failure(&e), true));
        }
    };
    held.loaded = Some(served.clone());
    agent.metrics.init_model(&served);
    agent.metrics.models_loaded.inc();
    agent.table().mark_loaded(incarnation, key);
    agent.node_dirty.notify_one();
    if cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }
    let footprint = if loaded.memory_bytes > 0 {
        loaded.memory_bytes
    } else {
        estimate
    };
    let ready = Stage::Ready {
        endpoint: agent.endpoint.clone(),
        footprint_bytes: footprint,
    };
    writer.write_lasting(&ready, facts, cancel).await;
    tracing::info!(replica = %key, model = %served, endpoint = %agent.endpoint, "ready");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::inventory::Device;

    fn replica(ns: &str, name: &str, uid: &str, served: &str) -> ModelReplica {
        let mut mr = ModelReplica::new(
            name,
            ModelReplicaSpec {
                model: "m".into(),
                source: "file:///models/m.gguf".into(),
                node_name: "n1".into(),
                served_name: served.into(),
                ..Default::default()
            },
        );
        mr.metadata.namespace = Some(ns.into());
        mr.metadata.uid = Some(uid.into());
        mr.metadata.generation = Some(1);
        mr
    }

    fn start(a: Action) -> Ticket {
        match a {
            Action::Start(t) => t,
            Action::Ignore => panic!("expected a worker to start"),
        }
    }

    #[test]
    fn a_status_update_of_the_same_replica_starts_nothing() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let mr = replica("ns", "a", "u1", "m");
        let first = start(t.apply(&mr, "n1", &shutdown));
        assert!(first.predecessors.is_empty());
        let mut with_status = mr.clone();
        with_status.status = Some(ModelReplicaStatus {
            phase: Some(ReplicaPhase::Pulling),
            ..Default::default()
        });
        assert!(matches!(
            t.apply(&with_status, "n1", &shutdown),
            Action::Ignore
        ));
        assert!(!first.cancel.is_cancelled());
    }

    #[test]
    fn a_new_object_or_spec_replaces_the_worker_after_it_stops() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let mr = replica("ns", "a", "u1", "m");
        let first = start(t.apply(&mr, "n1", &shutdown));
        let recreated = replica("ns", "a", "u2", "m");
        let second = start(t.apply(&recreated, "n1", &shutdown));
        assert!(
            first.cancel.is_cancelled(),
            "the old worker is told to stop"
        );
        assert_eq!(second.predecessors.len(), 1, "and the new one waits for it");
        assert!(!*second.predecessors[0].borrow());
        let mut changed = recreated.clone();
        changed.spec.source = "file:///models/other.gguf".into();
        let third = start(t.apply(&changed, "n1", &shutdown));
        assert!(second.cancel.is_cancelled());
        assert_eq!(third.predecessors.len(), 1);
        // The replaced worker finishing does not remove the current entry.
        t.finish(&first.key, first.incarnation);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_replica_failed_for_this_spec_is_not_retried() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let mut mr = replica("ns", "a", "u1", "m");
        mr.status = Some(ModelReplicaStatus {
            phase: Some(ReplicaPhase::Failed),
            reason: Some("OutOfMemory".into()),
            observed_generation: Some(1),
            ..Default::default()
        });
        assert!(matches!(t.apply(&mr, "n1", &shutdown), Action::Ignore));
        assert!(matches!(t.apply(&mr, "n1", &shutdown), Action::Ignore));
        // A failure within this process: the entry stays, the same spec is ignored.
        let other = replica("ns", "b", "u2", "m2");
        let tk = start(t.apply(&other, "n1", &shutdown));
        t.finish(&tk.key, tk.incarnation);
        let _ = tk.done.send(true);
        assert!(matches!(t.apply(&other, "n1", &shutdown), Action::Ignore));
        // Deleting a failed replica forgets it at once.
        assert!(t.delete(&tk.key));
        assert_eq!(t.len(), 1);
        // An older generation failed: the new spec is worked on.
        let mut newer = mr.clone();
        newer.metadata.generation = Some(2);
        newer.spec.source = "file:///models/fixed.gguf".into();
        assert!(matches!(t.apply(&newer, "n1", &shutdown), Action::Start(_)));
    }

    #[test]
    fn deletion_stops_the_worker_which_then_removes_the_entry() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let mr = replica("ns", "a", "u1", "m");
        let tk = start(t.apply(&mr, "n1", &shutdown));
        t.add_charge(
            tk.incarnation,
            Charge {
                device: Device::Gpu(0),
                bytes: 10,
                loaded: false,
            },
        );
        t.mark_loaded(tk.incarnation, &tk.key);
        assert_eq!(t.loaded_replicas(), vec!["ns/a".to_string()]);
        assert!(t.charges().all(|c| c.loaded));
        assert!(t.delete(&tk.key));
        assert!(tk.cancel.is_cancelled());
        assert_eq!(t.len(), 1, "kept until the worker has unloaded");
        assert_eq!(t.all_done().len(), 1);
        t.finish(&tk.key, tk.incarnation);
        assert!(t.is_empty());
        assert!(t.loaded_replicas().is_empty());
        assert_eq!(t.charges().count(), 0);
        assert!(t.all_done().is_empty());
        assert!(!t.delete(&tk.key), "unknown replica");
    }

    #[test]
    fn shutdown_cancels_every_worker() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let a = start(t.apply(&replica("ns", "a", "u1", "m1"), "n1", &shutdown));
        let b = start(t.apply(&replica("ns2", "b", "u2", "m2"), "n1", &shutdown));
        shutdown.cancel();
        assert!(a.cancel.is_cancelled() && b.cancel.is_cancelled());
    }

    #[test]
    fn relist_removes_replicas_no_longer_listed_and_other_nodes_are_ignored() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let a = start(t.apply(&replica("ns", "a", "u1", "m1"), "n1", &shutdown));
        let b = start(t.apply(&replica("ns", "b", "u2", "m2"), "n1", &shutdown));
        let listed = HashSet::from([a.key.clone()]);
        assert_eq!(t.retain_listed(&listed), vec![b.key.clone()]);
        assert!(b.cancel.is_cancelled());
        assert!(!a.cancel.is_cancelled());
        let mut elsewhere = replica("ns", "c", "u3", "m3");
        elsewhere.spec.node_name = "n2".into();
        assert!(matches!(
            t.apply(&elsewhere, "n1", &shutdown),
            Action::Ignore
        ));
        let mut deleting = replica("ns", "a", "u1", "m1");
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(matches!(
            t.apply(&deleting, "n1", &shutdown),
            Action::Ignore
        ));
        assert!(a.cancel.is_cancelled(), "a deletion timestamp unloads");
    }

    #[test]
    fn served_names_are_claimed_once_per_node() {
        let shutdown = CancellationToken::new();
        let mut t = ReplicaTable::default();
        let a = start(t.apply(&replica("ns", "a", "u1", "same"), "n1", &shutdown));
        let b = start(t.apply(&replica("other", "b", "u2", "same"), "n1", &shutdown));
        assert_eq!(t.claim_name("same", a.incarnation, &a.key), Ok(()));
        assert_eq!(
            t.claim_name("same", a.incarnation, &a.key),
            Ok(()),
            "idempotent"
        );
        assert_eq!(
            t.claim_name("same", b.incarnation, &b.key),
            Err(a.key.clone())
        );
        // Once the holder is deleted and gone, the name is free again; a new replica with that
        // name waits for a holder still unloading.
        t.delete(&a.key);
        let c = start(t.apply(&replica("ns3", "c", "u3", "same"), "n1", &shutdown));
        assert_eq!(c.predecessors.len(), 1, "waits for the unloading holder");
        t.finish(&a.key, a.incarnation);
        assert_eq!(t.claim_name("same", c.incarnation, &c.key), Ok(()));
    }

    #[test]
    fn context_follows_the_engine_rules() {
        assert_eq!(served_context(Some(4096), Some(8192)), 4096);
        assert_eq!(served_context(Some(16384), Some(8192)), 8192);
        assert_eq!(served_context(None, Some(8192)), 8192);
        assert_eq!(served_context(Some(512), None), 512);
        assert_eq!(served_context(None, None), 2048);
    }
}
