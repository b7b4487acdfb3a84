//! The LocalModel controller: keeps each model's ModelReplicas placed on live nodes, its Service
//! and EndpointSlices pointing at Ready replicas, and its status true.
//!
//! Reads come from reflector stores (GPUNodes, Nodes, heartbeat Leases, ModelReplicas) shared
//! with the triggers, so a reconcile never sees an older store than the event that woke it.
//! Replicas created or deleted by this process but not yet seen in the store are remembered
//! ([`Expectations`]) so a quick second reconcile does not place twice. Placement of all models
//! is serialised by one lock, so two models never race for the same free memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::conventions::{FINALIZER, MODEL_LABEL, OPERATOR_MANAGER};
use crds::gpu_node::GPUNode;
use crds::local_model::{LocalModel, LocalModelStatus, ModelPhase};
use crds::model_replica::ModelReplica;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use crate::endpoints;
use crate::inventory::{self, model_key};
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::placement;
use crate::replicas::{self, Verdict};
use crate::status::{self, Observed};

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("LocalModel has no namespace")]
    NoNamespace,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the reflector of {0} stopped")]
    StoreGone(&'static str),
}

impl Error {
    /// Short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } if s.code == 409 => "conflict",
            Error::Kube {
                source: kube::Error::Api(_),
                ..
            } => "api",
            Error::Kube { .. } => "transport",
            Error::NoNamespace => "invalid",
            Error::Finalizer(_) => "finalizer",
            Error::StoreGone(_) => "store",
        }
    }
}

/// `Ok` also when the object was already gone.
fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// How long a replica that failed for a node-specific reason keeps its node off-limits for
/// its model before the node may be tried again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(120);

/// How long a create or delete made by this process is remembered while the store catches up.
const EXPECTATION_TTL: Duration = Duration::from_secs(60);

/// Replicas this process created or deleted that its store may not show yet.
#[derive(Default)]
pub struct Expectations {
    created: HashMap<(String, String), (ModelReplica, Instant)>,
    deleted: HashMap<(String, String), Instant>,
}

fn mr_key(r: &ModelReplica) -> (String, String) {
    (r.namespace().unwrap_or_default(), r.name_any())
}

impl Expectations {
    /// `store` (the replicas the reflector shows) corrected by what this process did since.
    pub fn apply(&mut self, store: Vec<Arc<ModelReplica>>, now: Instant) -> Vec<ModelReplica> {
        self.created
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < EXPECTATION_TTL);
        self.deleted
            .retain(|_, at| now.saturating_duration_since(*at) < EXPECTATION_TTL);
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(store.len() + self.created.len());
        for r in store {
            let key = mr_key(&r);
            // The store caught up with a create: forget it.
            self.created.remove(&key);
            seen.insert(key.clone());
            if self.deleted.contains_key(&key) {
                continue;
            }
            out.push((*r).clone());
        }
        // The store caught up with a delete: forget it.
        self.deleted.retain(|k, _| seen.contains(k));
        for (k, (r, _)) in &self.created {
            if !seen.contains(k) && !self.deleted.contains_key(k) {
                out.push(r.clone());
            }
        }
        out
    }

    pub fn created(&mut self, r: ModelReplica, now: Instant) {
        let key = mr_key(&r);
        self.deleted.remove(&key);
        self.created.insert(key, (r, now));
    }

    pub fn deleted(&mut self, r: &ModelReplica, now: Instant) {
        let key = mr_key(r);
        self.created.remove(&key);
        self.deleted.insert(key, now);
    }
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub gpu_nodes: Store<GPUNode>,
    pub nodes: Store<Node>,
    pub replicas: Store<ModelReplica>,
    pub liveness: Arc<Mutex<Liveness>>,
    /// Held while computing and creating placements.
    pub placing: tokio::sync::Mutex<()>,
    pub expectations: Mutex<Expectations>,
    /// Last Service/EndpointSlices applied per model (serialised), to skip unchanged applies.
    applied: Mutex<HashMap<String, String>>,
    /// Phase per model for the models gauge.
    /// Phase and served name of every LocalModel, by `namespace/name`.
    phases: Mutex<HashMap<String, (ModelPhase, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn owner_ref(lm: &LocalModel) -> OwnerReference {
    // A LocalModel read from the API server always has a name and uid.
    lm.controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: "localmodel.dev/v1alpha1".into(),
            kind: "LocalModel".into(),
            name: lm.name_any(),
            uid: lm.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

fn object_ref(lm: &LocalModel) -> ObjectReference {
    lm.object_ref(&())
}

impl Context {
    async fn event(
        &self,
        lm: &LocalModel,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &object_ref(lm)).await {
            tracing::warn!(error = %e, model = %lm.name_any(), reason, "could not record an Event");
        }
    }

    /// The replicas of `lm` (by label, owned by this very object).
    fn own_replicas(&self, lm: &LocalModel) -> Vec<ModelReplica> {
        let ns = lm.namespace().unwrap_or_default();
        let name = lm.name_any();
        let all = self.replicas.state();
        lock(&self.expectations)
            .apply(all, Instant::now())
            .into_iter()
            .filter(|r| {
                r.namespace().as_deref() == Some(ns.as_str())
                    && r.labels().get(MODEL_LABEL) == Some(&name)
            })
            .collect()
    }

    /// Records a model's phase (None: the model is gone) in the phase gauges.
    fn set_phase(&self, lm: &LocalModel, phase: Option<ModelPhase>) {
        let ns = lm.namespace().unwrap_or_default();
        let name = lm.name_any();
        let key = model_key(&ns, &name);
        let mut phases = lock(&self.phases);
        let next = phase.map(|p| (p, lm.served_name().to_string()));
        let previous = match next.clone() {
            Some(n) => phases.insert(key, n),
            None => phases.remove(&key),
        };
        if previous != next {
            if let Some((p, served)) = &previous {
                let _ = self.metrics.model_info.remove_label_values(&[
                    ns.as_str(),
                    name.as_str(),
                    served.as_str(),
                    p.as_str(),
                ]);
            }
            if let Some((p, served)) = &next {
                self.metrics
                    .model_info
                    .with_label_values(&[ns.as_str(), name.as_str(), served.as_str(), p.as_str()])
                    .set(1);
            }
        }
        let counts = status::count_phases(phases.values().map(|(p, _)| p));
        for p in ModelPhase::ALL {
            self.metrics
                .models
                .with_label_values(&[p.as_str()])
                .set(counts.get(p.as_str()).copied().unwrap_or(0));
        }
    }
}

/// Reconciles one LocalModel.
pub async fn reconcile(lm: Arc<LocalModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.time_reconcile();
    let ns = lm.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<LocalModel> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, lm, |event| async {
        match event {
            Finalizer::Apply(lm) => apply(&lm, &ctx).await,
            Finalizer::Cleanup(lm) => cleanup(&lm, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciles
        .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
        .inc();
    result
}

/// What to do after an error: count it and retry later (never a hot loop).
pub fn error_policy(lm: Arc<LocalModel>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(model = %lm.name_any(), namespace = ?lm.namespace(), error = %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

async fn delete_replica(ctx: &Context, r: &ModelReplica) -> Result<(), Error> {
    let api: Api<ModelReplica> =
        Api::namespaced(ctx.client.clone(), &r.namespace().unwrap_or_default());
    ignore_not_found(api.delete(&r.name_any(), &DeleteParams::background()).await)
        .map_err(kube_err(format!("deleting ModelReplica {}", r.name_any())))?;
    lock(&ctx.expectations).deleted(r, Instant::now());
    Ok(())
}

async fn apply(lm: &LocalModel, ctx: &Context) -> Result<Action, Error> {
    let ns = lm.namespace().ok_or(Error::NoNamespace)?;
    let name = lm.name_any();
    let key = model_key(&ns, &name);
    let uid = lm.uid();
    let now = now_time();
    let instant = Instant::now();
    let mut requeue = Duration::from_secs(300);

    // 1. Sort the existing replicas.
    let mut current = ctx.own_replicas(lm);
    let mut live: Vec<ModelReplica> = Vec::new();
    let mut kept: Vec<ModelReplica> = Vec::new();
    let mut permanent_failure = None;
    for r in current.drain(..) {
        let owned_here = r
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref());
        if !owned_here {
            // Left over from an earlier LocalModel of the same name.
            delete_replica(ctx, &r).await?;
            continue;
        }
        if r.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let alive = lock(&ctx.liveness).alive(&r.spec.node_name, instant);
        match replicas::verdict(lm, &r, alive, &now, RETRY_FAILED_AFTER) {
            Verdict::Live => live.push(r),
            Verdict::NodeLost => {
                delete_replica(ctx, &r).await?;
                ctx.metrics
                    .placements
                    .with_label_values(&["node_lost"])
                    .inc();
                ctx.event(
                    lm,
                    EventType::Warning,
                    "NodeLost",
                    "Replace",
                    format!(
                        "the agent on {} stopped renewing its heartbeat; replica {} is placed elsewhere",
                        r.spec.node_name,
                        r.name_any()
                    ),
                )
                .await;
            }
            Verdict::Stale => {
                delete_replica(ctx, &r).await?;
                ctx.event(
                    lm,
                    EventType::Normal,
                    "SpecChanged",
                    "Replace",
                    format!(
                        "replica {} on {} was made from an older spec; replacing it",
                        r.name_any(),
                        r.spec.node_name
                    ),
                )
                .await;
            }
            Verdict::FailedPermanently { reason, message } => {
                if permanent_failure.is_none() {
                    permanent_failure = Some((reason, message));
                }
                kept.push(r);
            }
            Verdict::FailedRetryLater { retry_in } => {
                requeue = requeue.min(retry_in + Duration::from_secs(1));
                kept.push(r);
            }
            Verdict::FailedExpired => delete_replica(ctx, &r).await?,
        }
    }

    // 2. Scale down.
    let wanted = usize::try_from(lm.spec.replicas.max(0)).unwrap_or(0);
    let refs: Vec<&ModelReplica> = live.iter().collect();
    let mut drop_idx = replicas::scale_down(&refs, wanted);
    drop_idx.sort_unstable_by(|a, b| b.cmp(a));
    for i in drop_idx {
        let r = live.remove(i);
        delete_replica(ctx, &r).await?;
        ctx.event(
            lm,
            EventType::Normal,
            "ScaledDown",
            "Delete",
            format!(
                "removed replica {} on {} ({} wanted)",
                r.name_any(),
                r.spec.node_name,
                wanted
            ),
        )
        .await;
    }

    // 3. Place what is missing, unless no node can help.
    let all_mine: Vec<&ModelReplica> = live.iter().chain(kept.iter()).collect();
    let need = inventory::memory_need(lm, &all_mine);
    let digest = inventory::digest(lm, &all_mine);
    let mut unschedulable = None;
    if permanent_failure.is_none() && live.len() < wanted {
        let _guard = ctx.placing.lock().await;
        let instant = Instant::now();
        let gpu_nodes = ctx.gpu_nodes.state();
        let nodes: HashMap<String, Arc<Node>> = ctx
            .nodes
            .state()
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect();
        let views: Vec<placement::NodeView> = {
            let liveness = lock(&ctx.liveness);
            gpu_nodes
                .iter()
                .map(|g| {
                    let node_name = g.spec.node_name.clone();
                    inventory::node_view(
                        g,
                        nodes.get(&node_name).map(|n| n.as_ref()),
                        liveness.alive(&node_name, instant),
                    )
                })
                .collect()
        };
        let loaded = inventory::loaded_by_node(gpu_nodes.iter().map(|g| g.as_ref()));
        let all_replicas = lock(&ctx.expectations).apply(ctx.replicas.state(), instant);
        let bound: Vec<placement::BoundReplica> = all_replicas
            .iter()
            .filter(|r| {
                // This model's own replicas as decided above (deleted ones are gone).
                !(r.namespace().as_deref() == Some(ns.as_str())
                    && r.labels().get(MODEL_LABEL) == Some(&name))
            })
            .chain(live.iter())
            .chain(kept.iter())
            .map(|r| inventory::bound_replica(r, &loaded))
            .collect();
        let request = inventory::model_request(lm, need.unwrap_or(0), digest.clone());
        let decision = placement::place(&request, &views, &bound, wanted - live.len());
        let mr_api: Api<ModelReplica> = Api::namespaced(ctx.client.clone(), &ns);
        for p in &decision.placements {
            let mut mr = ModelReplica::new(
                &replicas::replica_name(&name, &p.node),
                replicas::desired_spec(lm, &p.node, need.and_then(|b| i64::try_from(b).ok())),
            );
            mr.metadata = ObjectMeta {
                name: mr.metadata.name.clone(),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([(MODEL_LABEL.to_string(), name.clone())])),
                owner_references: Some(vec![owner_ref(lm)]),
                ..Default::default()
            };
            match mr_api
                .create(
                    &PostParams {
                        field_manager: Some(OPERATOR_MANAGER.into()),
                        ..Default::default()
                    },
                    &mr,
                )
                .await
            {
                Ok(created) => {
                    lock(&ctx.expectations).created(created.clone(), Instant::now());
                    live.push(created);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // A replica of that name still exists (being deleted): try again shortly.
                    requeue = requeue.min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(kube_err(format!("creating ModelReplica on {}", p.node))(e)),
            }
            ctx.metrics
                .placements
                .with_label_values(&[if p.cached { "placed_cached" } else { "placed" }])
                .inc();
            ctx.event(
                lm,
                EventType::Normal,
                "Placed",
                "Schedule",
                format!(
                    "replica placed on {}: {}",
                    p.node,
                    p.reason(need.unwrap_or(0))
                ),
            )
            .await;
        }
        if let Some(msg) = &decision.unschedulable {
            ctx.metrics
                .placements
                .with_label_values(&["unschedulable"])
                .inc();
            let before = lm.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == crds::local_model::condition_type::SCHEDULED)
                    .map(|c| c.message.clone())
            });
            if before.as_deref() != Some(msg.as_str()) {
                ctx.event(
                    lm,
                    EventType::Warning,
                    "FailedScheduling",
                    "Schedule",
                    msg.clone(),
                )
                .await;
            }
            unschedulable = Some(msg.clone());
            // New nodes or freed memory trigger a reconcile; look again now and then anyway.
            requeue = requeue.min(Duration::from_secs(30));
        }
    }

    // 4. Service and EndpointSlices.
    let mut mine: Vec<ModelReplica> = live;
    mine.extend(kept);
    let owner = owner_ref(lm);
    sync_service(ctx, lm, &ns, &key, &mine, owner).await?;

    // 5. Status.
    let observed = Observed {
        unschedulable,
        permanent_failure: permanent_failure.clone(),
        endpoint: Some(endpoints::service_url(lm)),
        digest: digest.map(|d| format!("sha256:{d}")),
        memory_estimate_bytes: need.and_then(|b| i64::try_from(b).ok()),
    };
    let new_status = status::model_status(lm, &mine, &observed, &now);
    if lm.status.as_ref() != Some(&new_status) {
        write_status(ctx, lm, &ns, &new_status).await?;
        if let Some((from, to)) = status::phase_change(lm.status.as_ref(), &new_status) {
            let (type_, reason) = match to {
                ModelPhase::Failed => (EventType::Warning, "Failed"),
                ModelPhase::Degraded => (EventType::Warning, "Degraded"),
                _ => (EventType::Normal, to.as_str()),
            };
            let detail = new_status
                .conditions
                .iter()
                .find(|c| c.status == "False")
                .or_else(|| {
                    new_status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == crds::local_model::condition_type::READY)
                })
                .map(|c| c.message.clone())
                .unwrap_or_default();
            ctx.event(
                lm,
                type_,
                reason,
                "Reconcile",
                format!(
                    "{} -> {}: {}",
                    from.map(|p| p.as_str()).unwrap_or("New"),
                    to.as_str(),
                    detail
                ),
            )
            .await;
        }
    }
    ctx.set_phase(lm, new_status.phase);
    Ok(Action::requeue(requeue))
}

async fn write_status(
    ctx: &Context,
    lm: &LocalModel,
    ns: &str,
    status: &LocalModelStatus,
) -> Result<(), Error> {
    let api: Api<LocalModel> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": "localmodel.dev/v1alpha1",
        "kind": "LocalModel",
        "status": status,
    });
    api.patch_status(
        &lm.name_any(),
        &PatchParams::apply(OPERATOR_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err("writing LocalModel status"))?;
    Ok(())
}

/// Applies the Service and EndpointSlices of `lm` when they differ from what this process last
/// applied, and deletes slices no longer wanted.
async fn sync_service(
    ctx: &Context,
    lm: &LocalModel,
    ns: &str,
    key: &str,
    replicas: &[ModelReplica],
    owner: OwnerReference,
) -> Result<(), Error> {
    let svc = endpoints::service(lm, owner.clone());
    let slices = endpoints::endpoint_slices(lm, replicas, &owner);
    let fingerprint = serde_json::to_string(&(&svc, &slices)).unwrap_or_default();
    if lock(&ctx.applied).get(key) == Some(&fingerprint) {
        return Ok(());
    }
    let pp = PatchParams::apply(OPERATOR_MANAGER).force();
    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    svc_api
        .patch(&lm.name_any(), &pp, &Patch::Apply(&svc))
        .await
        .map_err(kube_err("applying the Service"))?;
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
    let mut wanted = BTreeSet::new();
    for s in &slices {
        let sname = s.metadata.name.clone().unwrap_or_default();
        slice_api
            .patch(&sname, &pp, &Patch::Apply(s))
            .await
            .map_err(kube_err(format!("applying EndpointSlice {sname}")))?;
        wanted.insert(sname);
    }
    let existing = slice_api
        .list(&ListParams::default().labels(&format!("{MODEL_LABEL}={}", lm.name_any())))
        .await
        .map_err(kube_err("listing EndpointSlices"))?;
    for s in existing {
        let sname = s.name_any();
        if !wanted.contains(&sname) {
            ignore_not_found(slice_api.delete(&sname, &DeleteParams::default()).await)
                .map_err(kube_err(format!("deleting EndpointSlice {sname}")))?;
        }
    }
    lock(&ctx.applied).insert(key.to_string(), fingerprint);
    Ok(())
}

/// Removes what the operator made for `lm`. Nothing relies on garbage collection: the objects
/// are deleted explicitly (owner references still let the garbage collector clean up after a
/// crash).
async fn cleanup(lm: &LocalModel, ctx: &Context) -> Result<Action, Error> {
    let ns = lm.namespace().ok_or(Error::NoNamespace)?;
    let name = lm.name_any();
    let selector = format!("{MODEL_LABEL}={name}");
    let lp = ListParams::default().labels(&selector);
    let mr_api: Api<ModelReplica> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = mr_api
        .list(&lp)
        .await
        .map_err(kube_err("listing ModelReplicas"))?;
    for r in existing {
        delete_replica(ctx, &r).await?;
    }
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    ignore_not_found(
        slice_api
            .delete_collection(&DeleteParams::default(), &lp)
            .await,
    )
    .map_err(kube_err("deleting EndpointSlices"))?;
    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    match svc_api
        .get_opt(&name)
        .await
        .map_err(kube_err("reading the Service"))?
    {
        Some(svc) if svc.labels().get(MODEL_LABEL) == Some(&name) => {
            ignore_not_found(svc_api.delete(&name, &DeleteParams::default()).await)
                .map_err(kube_err("deleting the Service"))?;
        }
        _ => {}
    }
    let key = model_key(&ns, &name);
    lock(&ctx.applied).remove(&key);
    ctx.set_phase(lm, None);
    ctx.event(
        lm,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        "replicas, Service and EndpointSlices removed".into(),
    )
    .await;
    Ok(Action::await_change())
}

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace of the agents' heartbeat Leases.
    pub agents_namespace: String,
    /// Name of this process in Events.
    pub instance: Option<String>,
}

/// Starts the reflectors, waits until they are in sync, then runs the controller until
/// `shutdown` resolves.
pub async fn run(
    client: Client,
    metrics: Metrics,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let wc = watcher::Config::default();
    let (trigger_tx, trigger_rx) = mpsc::channel::<()>(16);

    // GPUNodes: a change may make room for a waiting model.
    let (gpu_nodes, gpu_writer) = reflector::store();
    let gpu_stream = watcher(Api::<GPUNode>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(gpu_writer)
        .applied_objects();
    keep_reflecting("GPUNodes", gpu_stream, Some(trigger_tx.clone()));

    // Nodes: labels and taints.
    let (nodes, node_writer) = reflector::store();
    let node_stream = watcher(Api::<Node>::all(client.clone()), wc.clone().any_semantic())
        .default_backoff()
        .reflect(node_writer)
        .touched_objects();
    keep_reflecting("Nodes", node_stream, None);

    // Heartbeat Leases of the agents.
    let (leases, lease_writer) = reflector::store::<Lease>();
    let lease_stream = watcher(
        Api::<Lease>::namespaced(client.clone(), &settings.agents_namespace),
        wc.clone(),
    )
    .default_backoff()
    .reflect(lease_writer)
    .touched_objects();
    keep_reflecting("heartbeat Leases", lease_stream, None);

    // ModelReplicas: shared between the store and the controller's trigger.
    let (replicas_store, mr_writer) = reflector::store_shared::<ModelReplica>(1024);
    let mr_subscriber = mr_writer
        .subscribe()
        .ok_or(Error::StoreGone("ModelReplicas"))?;
    let mr_stream = watcher(Api::<ModelReplica>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect_shared(mr_writer)
        .touched_objects();
    keep_reflecting("ModelReplicas", mr_stream, None);

    for (what, ready) in [
        ("GPUNodes", gpu_nodes.wait_until_ready().await),
        ("Nodes", nodes.wait_until_ready().await),
        ("Leases", leases.wait_until_ready().await),
        ("ModelReplicas", replicas_store.wait_until_ready().await),
    ] {
        ready.map_err(|_| Error::StoreGone(what))?;
    }
    tracing::info!("caches in sync");

    // Liveness: re-judge the heartbeats every 2 s; reconcile everything when the set changes.
    let liveness = Arc::new(Mutex::new(Liveness::default()));
    {
        let liveness = liveness.clone();
        let leases = leases.clone();
        lock(&liveness).observe(leases.state().iter().map(|l| l.as_ref()), Instant::now());
        let tx = trigger_tx.clone();
        tokio::spawn(async move {
            let mut alive = lock(&liveness).alive_set(Instant::now());
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let now = Instant::now();
                let next = {
                    let mut l = lock(&liveness);
                    l.observe(leases.state().iter().map(|l| l.as_ref()), now);
                    l.alive_set(now)
                };
                if next != alive {
                    let gone: Vec<&String> = alive.difference(&next).collect();
                    let new: Vec<&String> = next.difference(&alive).collect();
                    tracing::info!(?gone, ?new, "node agents changed");
                    alive = next;
                    let _ = tx.try_send(());
                }
            }
        });
    }

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: OPERATOR_MANAGER.into(),
            instance: settings.instance.clone(),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        gpu_nodes,
        nodes,
        replicas: replicas_store,
        liveness,
        placing: tokio::sync::Mutex::new(()),
        expectations: Mutex::new(Expectations::default()),
        applied: Mutex::new(HashMap::new()),
        phases: Mutex::new(HashMap::new()),
    });

    let trigger = tokio_stream_from(trigger_rx);
    Controller::new(Api::<LocalModel>::all(client), wc)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(200)))
        .owns_shared_stream(mr_subscriber)
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(model = %obj.name, "reconciled"),
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                    tracing::debug!(model = %obj.name, error = %e, "reconcile failed")
                }
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        })
        .await;
    Ok(())
}

/// Polls a reflector's stream for the life of the process (which keeps its store current),
/// logging watch errors (the watcher backs off and resumes) and poking `trigger`, when given,
/// after each change.
fn keep_reflecting<T: Send + 'static>(
    what: &'static str,
    stream: impl futures::Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    trigger: Option<mpsc::Sender<()>>,
) {
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if let Some(tx) = &trigger {
                        let _ = tx.try_send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching {what}"),
            }
        }
    });
}

/// The triggers as a stream.
fn tokio_stream_from(rx: mpsc::Receiver<()>) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::model_replica::ModelReplicaSpec;

    fn mr(name: &str) -> ModelReplica {
        let mut r = ModelReplica::new(name, ModelReplicaSpec::default());
        r.metadata.namespace = Some("ns".into());
        r
    }

    #[test]
    fn expectations_fill_in_until_the_store_catches_up() {
        let t = Instant::now();
        let mut e = Expectations::default();
        e.created(mr("a"), t);
        let seen = e.apply(vec![Arc::new(mr("b"))], t);
        let names: Vec<String> = seen.iter().map(|r| r.name_any()).collect();
        assert_eq!(
            names,
            ["b", "a"],
            "a was created but the store does not show it yet"
        );

        e.deleted(&mr("b"), t);
        let seen = e.apply(vec![Arc::new(mr("a")), Arc::new(mr("b"))], t);
        let names: Vec<String> = seen.iter().map(|r| r.name_any()).collect();
        assert_eq!(names, ["a"], "b was deleted but the store still shows it");

        // The store caught up on both.
        let seen = e.apply(vec![Arc::new(mr("a"))], t);
        assert_eq!(seen.len(), 1);
        assert!(e.created.is_empty() && e.deleted.is_empty());
    }

    #[test]
    fn expectations_expire() {
        let t = Instant::now();
        let mut e = Expectations::default();
        e.created(mr("a"), t);
        let seen = e.apply(vec![], t + EXPECTATION_TTL + Duration::from_secs(1));
        assert!(
            seen.is_empty(),
            "a create never seen is forgotten after the TTL"
        );
    }
}
