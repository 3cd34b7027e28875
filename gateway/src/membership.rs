//! Membership: which agents exist, what they last reported, and whether each is ready, draining
//! or down (time passed in); plus the snapshot built from it that requests read: the routing
//! table and the merged language catalog.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use codefleet_shared::cluster::{
    CapacityReport, LanguageCapacity, NodeInfo, NodeLanguage, NodeState,
};
use codefleet_shared::ids::{self, NODE_ID_RULE};
use codefleet_shared::version::{compare_versions, newest, version_matches};
use codefleet_shared::{ImageState, LanguageInfo};
use tokio::sync::{watch, Notify};

use crate::error::GatewayError;
use crate::routing::{NodeEntry, NodeId, RoutingTable};

/// A node as requests see it: where it is, and its live load.
///
/// The load routing uses is `inflight + others`: this gateway's own jobs on the node, counted
/// exactly, plus the busy slots of the node's last report that were not ours. Reports lag (one a
/// second), so subtracting our in-flight count at the moment a report arrives could still count a
/// job twice: one that was running when the agent wrote the report and finished before it arrived.
/// So `others` subtracts the *highest* in-flight count since the previous report instead. It may
/// under-count other gateways' jobs by ours, never count ours twice, and a lone stream of
/// sequential jobs therefore always sees its primary at load 0.
#[derive(Debug)]
pub struct NodeHandle {
    pub id: NodeId,
    /// Base URL, e.g. `http://127.0.0.1:7001`, without a trailing slash.
    pub address: String,
    inflight: AtomicU32,
    peak: AtomicU32,
    others: AtomicU32,
    /// Set to true when membership decides the node is gone, so in-flight calls stop waiting.
    lost: watch::Sender<bool>,
    /// A liveness probe of this node is under way.
    pub probing: std::sync::atomic::AtomicBool,
}

impl NodeHandle {
    fn new(id: &str, address: String) -> NodeHandle {
        NodeHandle {
            id: NodeId::new(id),
            address,
            inflight: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            others: AtomicU32::new(0),
            lost: watch::Sender::new(false),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Jobs this gateway has in flight on the node.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The load routing compares against the bound and the slot count.
    pub fn load(&self) -> u32 {
        self.inflight
            .load(Ordering::Relaxed)
            .saturating_add(self.others.load(Ordering::Relaxed))
    }

    /// Counts a job as in flight on this node until the guard drops; `freed` is notified then.
    pub fn begin(self: &Arc<Self>, freed: Arc<Notify>) -> InflightGuard {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        crate::metrics::node_inflight(&self.id, now);
        InflightGuard {
            node: Arc::clone(self),
            freed,
        }
    }

    /// Resolves when membership marks the node lost (down); pending forever otherwise.
    pub async fn lost(&self) {
        let mut rx = self.lost.subscribe();
        if rx.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// True once membership has declared the node lost (until it reports again).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    fn on_report(&self, busy: u32) {
        let peak = self
            .peak
            .swap(self.inflight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.others
            .store(busy.saturating_sub(peak), Ordering::Relaxed);
    }
}

/// A job counted on a node; dropping it ends the count and wakes jobs waiting for room.
pub struct InflightGuard {
    node: Arc<NodeHandle>,
    freed: Arc<Notify>,
}

impl InflightGuard {
    /// The node the job runs on.
    pub fn node(&self) -> &Arc<NodeHandle> {
        &self.node
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let now = self.node.inflight.fetch_sub(1, Ordering::Relaxed) - 1;
        crate::metrics::node_inflight(&self.node.id, now);
        self.freed.notify_waiters();
    }
}

#[derive(Debug)]
struct Member {
    report: CapacityReport,
    handle: Arc<NodeHandle>,
    last_report: Instant,
    /// Missed too many reports; cleared by the next one.
    missed: bool,
    /// Refused a connection; cleared by the next report.
    unreachable: bool,
    /// Drained by an operator (`POST /v1/nodes/{id}/drain`); kept until the node is removed.
    drained: bool,
}

impl Member {
    fn state(&self) -> NodeState {
        if self.missed || self.unreachable || !self.report.ready {
            NodeState::Down
        } else if self.drained || self.report.draining {
            NodeState::Draining
        } else {
            NodeState::Ready
        }
    }

    /// Everything the snapshot depends on, to tell whether a report changed it.
    fn view(
        &self,
    ) -> (
        NodeState,
        u32,
        *const NodeHandle,
        Vec<(String, LanguageCapacity)>,
    ) {
        let languages = self.report.all_runtimes().into_iter().map(|(_, id, l)| {
            let l = LanguageCapacity {
                warm: 0,
                ..l.clone()
            };
            (id.to_string(), l)
        });
        let handle = Arc::as_ptr(&self.handle);
        (
            self.state(),
            self.report.slots_total,
            handle,
            languages.collect(),
        )
    }
}

/// All known nodes. Not thread-safe by itself: the gateway keeps it behind a mutex.
#[derive(Debug)]
pub struct Membership {
    members: BTreeMap<String, Member>,
    /// A node whose last report is older than this is down.
    down_after: Duration,
}

impl Membership {
    pub fn new(report_interval: Duration, missed_reports: u32) -> Membership {
        Membership {
            members: BTreeMap::new(),
            down_after: report_interval * missed_reports,
        }
    }

    /// Takes a capacity report (the first one registers the node). Returns whether the snapshot
    /// must be rebuilt.
    pub fn report(
        &mut self,
        mut report: CapacityReport,
        now: Instant,
    ) -> Result<bool, GatewayError> {
        if ids::NodeId::parse(&report.node_id).is_err() {
            return Err(GatewayError::invalid(format!(
                "node_id {:?} is not {NODE_ID_RULE}",
                report.node_id
            )));
        }
        let address = report.address.trim_end_matches('/').to_string();
        match reqwest::Url::parse(&address) {
            Ok(url) if url.scheme() == "http" && url.host().is_some() => {}
            _ => {
                return Err(GatewayError::invalid(format!(
                    "address {:?} is not an http:// base URL",
                    report.address
                )))
            }
        }
        report.address = address;
        let busy = report.slots_busy;
        let member = match self.members.get_mut(&report.node_id) {
            Some(member) => member,
            None => {
                let id = report.node_id.clone();
                let handle = Arc::new(NodeHandle::new(&id, report.address.clone()));
                self.members.insert(
                    id.clone(),
                    Member {
                        report,
                        handle: Arc::clone(&handle),
                        last_report: now,
                        missed: false,
                        unreachable: false,
                        drained: false,
                    },
                );
                handle.on_report(busy);
                tracing::info!(node = %handle.id, address = %handle.address, "node registered");
                return Ok(true);
            }
        };
        let before = member.view();
        if member.handle.address != report.address {
            member.handle = Arc::new(NodeHandle::new(&report.node_id, report.address.clone()));
        }
        if member.missed {
            member.handle.lost.send_replace(false);
            tracing::info!(node = %member.handle.id, "node reporting again");
        }
        member.report = report;
        member.last_report = now;
        member.missed = false;
        member.unreachable = false;
        member.handle.on_report(busy);
        Ok(member.view() != before)
    }

    /// Marks down every node whose last report is too old, and tells their in-flight calls.
    /// Returns whether any node changed state.
    pub fn sweep(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for member in self.members.values_mut() {
            if !member.missed && now.saturating_duration_since(member.last_report) > self.down_after
            {
                member.missed = true;
                member.handle.lost.send_replace(true);
                tracing::warn!(node = %member.handle.id, "node missed its reports; marked down");
                changed = true;
            }
        }
        changed
    }

    /// Nodes that are late with a report (silent for more than `after`) while jobs of ours run
    /// on them: worth a liveness probe, so a node that died silently is noticed before it
    /// misses enough reports to be marked down.
    pub fn overdue(&self, now: Instant, after: Duration) -> Vec<Arc<NodeHandle>> {
        self.members
            .values()
            .filter(|m| !m.missed && m.handle.inflight() > 0)
            .filter(|m| now.saturating_duration_since(m.last_report) > after)
            .map(|m| Arc::clone(&m.handle))
            .collect()
    }

    /// Marks `id` down now (a failed liveness probe), telling its in-flight calls. Ignored when
    /// the node reported since `since` (it is alive after all). Returns whether anything changed.
    pub fn mark_lost(&mut self, id: &str, since: Instant) -> bool {
        let Some(member) = self.members.get_mut(id) else {
            return false;
        };
        if member.missed || member.last_report > since {
            return false;
        }
        member.missed = true;
        member.handle.lost.send_replace(true);
        tracing::warn!(node = %member.handle.id, "node late and not answering; marked down");
        true
    }

    /// Stops new work going to the node. Returns its handle, to tell the agent.
    pub fn drain(&mut self, id: &str) -> Option<Arc<NodeHandle>> {
        let member = self.members.get_mut(id)?;
        member.drained = true;
        Some(Arc::clone(&member.handle))
    }

    /// Forgets the node; it registers anew if it reports again. Its in-flight jobs go on.
    pub fn remove(&mut self, id: &str) -> bool {
        self.members.remove(id).is_some()
    }

    /// Takes the node out of routing after it refused a connection, until it reports again.
    /// Does not fire `lost`: a refusing agent may still be finishing jobs while it shuts down.
    pub fn mark_unreachable(&mut self, handle: &NodeHandle) -> bool {
        match self.members.get_mut(handle.id.as_str()) {
            Some(m) if std::ptr::eq(Arc::as_ptr(&m.handle), handle) && !m.unreachable => {
                m.unreachable = true;
                true
            }
            _ => false,
        }
    }

    /// The node's handle and state, for requests bound to a node (sessions).
    pub fn node(&self, id: &str) -> Option<(Arc<NodeHandle>, NodeState)> {
        let member = self.members.get(id)?;
        Some((Arc::clone(&member.handle), member.state()))
    }

    pub fn count(&self, state: NodeState) -> usize {
        self.members.values().filter(|m| m.state() == state).count()
    }

    /// `GET /v1/nodes`, sorted by id.
    pub fn node_infos(&self, shares: &HashMap<NodeId, f64>) -> Vec<NodeInfo> {
        self.members
            .values()
            .map(|m| NodeInfo {
                id: m.report.node_id.clone(),
                address: m.handle.address.clone(),
                state: m.state(),
                slots_total: m.report.slots_total,
                slots_busy: m.report.slots_busy,
                ring_share: shares.get(&m.handle.id).copied().unwrap_or(0.0),
                languages: m
                    .report
                    .languages
                    .iter()
                    .map(|(name, l)| {
                        let info = NodeLanguage {
                            image: l.image,
                            warm: l.warm,
                        };
                        (name.clone(), info)
                    })
                    .collect(),
            })
            .collect()
    }

    /// A new snapshot; its ring is `previous`'s updated with who joined and left.
    pub fn snapshot(&self, previous: &Snapshot) -> Snapshot {
        let entries = self
            .members
            .values()
            .filter(|m| m.state() == NodeState::Ready)
            .map(|m| NodeEntry {
                id: m.handle.id.clone(),
                slots_total: m.report.slots_total,
                languages: ready_runtimes(&m.report),
                load: Arc::clone(&m.handle),
            })
            .collect();
        let ready_slots = self
            .members
            .values()
            .filter(|m| m.state() == NodeState::Ready)
            .map(|m| m.report.slots_total)
            .sum();
        Snapshot {
            table: previous.table.update(entries),
            catalog: self.catalog(),
            ready_nodes: self.count(NodeState::Ready),
            ready_slots,
        }
    }

    /// Runtimes merged over every known node, by language name and runtime id; `nodes_ready`
    /// counts ready nodes with the runtime's image ready. The version shown is the newest a
    /// ready node runs. A language whose runtimes no node has read a version of yet shows once.
    fn catalog(&self) -> Catalog {
        let mut merged: BTreeMap<(String, String), Runtime> = BTreeMap::new();
        for member in self.members.values() {
            let ready = member.state() == NodeState::Ready;
            for (name, id, l) in member.report.all_runtimes() {
                let runtime = merged
                    .entry((name.to_string(), id.to_string()))
                    .or_insert_with(|| Runtime {
                        id: id.to_string(),
                        info: LanguageInfo {
                            name: name.to_string(),
                            aliases: l.aliases.clone(),
                            version: String::new(),
                            compiled: l.compiled,
                            file_name: l.file_name.clone(),
                            nodes_ready: 0,
                            image: None,
                            error: None,
                        },
                        versions: Vec::new(),
                    });
                if !l.version.is_empty() && !runtime.versions.contains(&l.version) {
                    runtime.versions.push(l.version.clone());
                }
                if ready && serves(l) {
                    runtime.info.nodes_ready += 1;
                    if compare_versions(&l.version, &runtime.info.version).is_gt() {
                        runtime.info.version = l.version.clone();
                    }
                }
            }
        }
        let mut runtimes: Vec<Runtime> = merged.into_values().collect();
        let named: std::collections::HashSet<String> = runtimes
            .iter()
            .filter(|r| !r.versions.is_empty())
            .map(|r| r.info.name.clone())
            .collect();
        let mut seen = std::collections::HashSet::new();
        runtimes.retain(|r| {
            !r.versions.is_empty()
                || (!named.contains(&r.info.name) && seen.insert(r.info.name.clone()))
        });
        runtimes.sort_by(|a, b| {
            a.info
                .name
                .cmp(&b.info.name)
                .then_with(|| compare_versions(&b.info.version, &a.info.version))
                .then_with(|| compare_versions(newest_seen(b), newest_seen(a)))
        });
        let mut aliases = HashMap::new();
        for r in &runtimes {
            for alias in r.info.aliases.iter().chain([&r.info.name]) {
                aliases
                    .entry(alias.to_ascii_lowercase())
                    .or_insert(r.info.name.clone());
            }
        }
        Catalog { runtimes, aliases }
    }
}

/// Whether a node serves a runtime it reports: its image is ready and its version read (an
/// agent reads the version from the image before it serves it; routing a job by version to a
/// node whose version is unknown could pick a runtime the node would not run).
fn serves(l: &LanguageCapacity) -> bool {
    l.image == ImageState::Ready && !l.version.is_empty()
}

/// The runtimes `report` serves, by language.
fn ready_runtimes(report: &CapacityReport) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (name, id, l) in report.all_runtimes() {
        if serves(l) {
            let runtime = (id.to_string(), l.version.clone());
            out.entry(name.to_string()).or_default().push(runtime);
        }
    }
    out
}

fn newest_seen(r: &Runtime) -> &str {
    newest(r.versions.iter().map(String::as_str)).unwrap_or("")
}

/// What requests read, published as one immutable value and swapped whole.
pub struct Snapshot {
    pub table: RoutingTable<Arc<NodeHandle>>,
    pub catalog: Catalog,
    pub ready_nodes: usize,
    /// Slots of all ready nodes together.
    pub ready_slots: u32,
}

impl Snapshot {
    pub fn empty(vnodes: usize) -> Snapshot {
        Snapshot {
            table: RoutingTable::new(vnodes, Vec::new()),
            catalog: Catalog::default(),
            ready_nodes: 0,
            ready_slots: 0,
        }
    }
}

/// One runtime merged over the nodes that report it.
#[derive(Debug)]
struct Runtime {
    /// The runtime id nodes report (`""` from agents that report no runtimes).
    id: String,
    info: LanguageInfo,
    /// Every version any node reported for it.
    versions: Vec<String>,
}

impl Runtime {
    /// Whether a ready node runs a version `version` names, and the newest version any node
    /// reported that it names; `None` when none does.
    fn best(&self, version: Option<&str>) -> Option<(bool, &str)> {
        let ready = self.info.nodes_ready > 0 && version_matches(version, &self.info.version);
        let matching = self
            .versions
            .iter()
            .map(String::as_str)
            .filter(|v| version_matches(version, v));
        newest(matching).map(|v| (ready, v))
    }
}

/// The merged runtimes (each with the versions seen on any node) and the languages' names and
/// aliases.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Sorted by name, the newest version first.
    runtimes: Vec<Runtime>,
    /// Lowercase name or alias → name.
    aliases: HashMap<String, String>,
}

impl Catalog {
    /// Every runtime, by name, the newest first: a language's first is its default.
    pub fn languages(&self) -> impl Iterator<Item = &LanguageInfo> {
        self.runtimes.iter().map(|r| &r.info)
    }

    /// The language names, sorted, each once.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.languages().map(|l| l.name.clone()).collect();
        names.dedup();
        names
    }

    /// The runtime a request names (see [`Catalog::resolve_runtime`]).
    pub fn resolve(
        &self,
        language: &str,
        version: Option<&str>,
    ) -> Result<&LanguageInfo, GatewayError> {
        self.resolve_runtime(language, version)
            .map(|(info, _)| info)
    }

    /// The runtime a request names, and its id: among the runtimes of the language that the
    /// name or alias names, the one with the newest version `version` names, preferring runtimes
    /// ready on some node; `unknown_language` when no runtime has such a version.
    pub fn resolve_runtime(
        &self,
        language: &str,
        version: Option<&str>,
    ) -> Result<(&LanguageInfo, &str), GatewayError> {
        let unknown = |what: String| GatewayError::UnknownLanguage {
            what,
            available: self.names(),
        };
        let asked = language.to_ascii_lowercase();
        let name = self
            .aliases
            .get(&asked)
            .ok_or_else(|| unknown(format!("no language {language:?}")))?;
        let candidates: Vec<&Runtime> = self
            .runtimes
            .iter()
            .filter(|r| &r.info.name == name)
            .filter(|r| r.info.name == asked || r.info.aliases.contains(&asked))
            .collect();
        let chosen = candidates
            .iter()
            .filter_map(|r| r.best(version).map(|b| (b, *r)))
            .max_by(|((ra, va), _), ((rb, vb), _)| ra.cmp(rb).then(compare_versions(va, vb)))
            .map(|(_, r)| r);
        match (chosen, version) {
            (Some(r), _) => Ok((&r.info, &r.id)),
            (None, None) => {
                let r = candidates.first().expect("every alias names a runtime");
                Ok((&r.info, &r.id))
            }
            (None, Some(v)) => {
                let mut known: Vec<&str> = candidates
                    .iter()
                    .flat_map(|r| r.versions.iter().map(String::as_str))
                    .collect();
                known.sort_by(|a, b| compare_versions(b, a));
                Err(unknown(format!(
                    "no version {v:?} of {name}; known: {}",
                    known.join(", ")
                )))
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runtimes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn language(image: ImageState, version: &str) -> LanguageCapacity {
        LanguageCapacity {
            image,
            warm: 2,
            version: version.to_string(),
            aliases: vec![format!("alias-of-{version}")],
            compiled: false,
            file_name: "main.py".to_string(),
            error: None,
        }
    }

    fn python(version: &str) -> LanguageCapacity {
        LanguageCapacity {
            aliases: vec!["py".to_string(), "python3".to_string()],
            ..language(ImageState::Ready, version)
        }
    }

    fn report(id: &str, busy: u32) -> CapacityReport {
        CapacityReport {
            node_id: id.to_string(),
            address: "http://127.0.0.1:7001/".to_string(),
            slots_total: 4,
            slots_busy: busy,
            queued: 0,
            draining: false,
            ready: true,
            languages: [("python".to_string(), python("3.11.2"))].into(),
            sessions: 0,
            runtimes: vec![],
            image_bytes: None,
        }
    }

    fn membership() -> Membership {
        Membership::new(Duration::from_secs(1), 3)
    }

    fn state(m: &Membership, id: &str) -> NodeState {
        m.node(id).unwrap().1
    }

    #[test]
    fn first_report_registers_and_later_ones_change_only_what_matters() {
        let (mut m, t0) = (membership(), Instant::now());
        assert!(m.report(report("a", 0), t0).unwrap());
        assert_eq!(m.node("a").unwrap().0.address, "http://127.0.0.1:7001");
        assert!(
            !m.report(report("a", 1), t0).unwrap(),
            "busy alone changes nothing"
        );
        let mut warmer = report("a", 1);
        warmer.languages.get_mut("python").unwrap().warm = 9;
        assert!(
            !m.report(warmer, t0).unwrap(),
            "warm count alone changes nothing"
        );
        let mut draining = report("a", 1);
        draining.draining = true;
        assert!(m.report(draining, t0).unwrap());
        assert_eq!(state(&m, "a"), NodeState::Draining);
    }

    #[test]
    fn rejects_bad_ids_and_addresses() {
        let mut m = membership();
        for (id, address) in [
            ("a.b", "http://h:1"),
            ("", "http://h:1"),
            ("a", "https://h:1"),
            ("a", "h:1"),
        ] {
            let mut r = report(id, 0);
            r.address = address.to_string();
            assert!(m.report(r, Instant::now()).is_err(), "{id} {address}");
        }
    }

    #[test]
    fn down_after_missed_reports_and_back_on_the_next() {
        let (mut m, t0) = (membership(), Instant::now());
        m.report(report("a", 0), t0).unwrap();
        let handle = m.node("a").unwrap().0;
        let lost = handle.lost.subscribe();
        assert!(!m.sweep(t0 + Duration::from_millis(2_900)));
        assert_eq!(state(&m, "a"), NodeState::Ready);
        assert!(m.sweep(t0 + Duration::from_millis(3_100)));
        assert_eq!(state(&m, "a"), NodeState::Down);
        assert!(*lost.borrow(), "in-flight calls are told");
        assert!(!m.sweep(t0 + Duration::from_secs(10)), "already down");
        assert!(m
            .report(report("a", 0), t0 + Duration::from_secs(11))
            .unwrap());
        assert_eq!(state(&m, "a"), NodeState::Ready);
        assert!(!*lost.borrow());
    }

    #[test]
    fn drain_remove_and_unreachable() {
        let (mut m, t0) = (membership(), Instant::now());
        m.report(report("a", 0), t0).unwrap();
        let handle = m.drain("a").unwrap();
        assert_eq!(state(&m, "a"), NodeState::Draining);
        m.report(report("a", 0), t0).unwrap();
        assert_eq!(
            state(&m, "a"),
            NodeState::Draining,
            "an operator's drain sticks"
        );
        assert!(m.remove("a") && !m.remove("a"));
        assert!(m.drain("a").is_none());
        m.report(report("a", 0), t0).unwrap();
        assert!(!m.mark_unreachable(&handle), "a stale handle marks nothing");
        let fresh = m.node("a").unwrap().0;
        assert!(m.mark_unreachable(&fresh));
        assert_eq!(state(&m, "a"), NodeState::Down);
        assert!(
            !*fresh.lost.borrow(),
            "refusing is not losing in-flight jobs"
        );
        m.report(report("a", 0), t0).unwrap();
        assert_eq!(state(&m, "a"), NodeState::Ready);
    }

    #[test]
    fn own_jobs_are_not_counted_twice() {
        let (mut m, t0) = (membership(), Instant::now());
        let freed = Arc::new(Notify::new());
        m.report(report("a", 0), t0).unwrap();
        let node = m.node("a").unwrap().0;
        // A lone stream: each report says one busy slot, which was always ours.
        for _ in 0..3 {
            let job = node.begin(Arc::clone(&freed));
            drop(job);
            m.report(report("a", 1), t0).unwrap();
            assert_eq!(node.load(), 0);
        }
        // Another gateway's two jobs show up beside ours.
        let job = node.begin(Arc::clone(&freed));
        m.report(report("a", 3), t0).unwrap();
        assert_eq!(node.load(), 3);
        drop(job);
        assert_eq!(node.load(), 2);
    }

    #[test]
    fn catalog_merges_and_resolves() {
        let (mut m, t0) = (membership(), Instant::now());
        m.report(report("a", 0), t0).unwrap();
        let mut b = report("b", 0);
        b.languages.insert("python".into(), python("3.12.1"));
        b.languages
            .insert("go".into(), language(ImageState::Preparing, ""));
        m.report(b, t0).unwrap();
        let snapshot = m.snapshot(&Snapshot::empty(160));
        let catalog = &snapshot.catalog;
        let python = catalog.resolve("PY", None).unwrap();
        assert_eq!((python.nodes_ready, python.version.as_str()), (2, "3.12.1"));
        assert_eq!(catalog.resolve("go", None).unwrap().nodes_ready, 0);
        assert!(catalog.resolve("python", Some("3.11")).is_ok());
        let errors = [
            catalog.resolve("python", Some("2")).unwrap_err(),
            catalog.resolve("cobol", None).unwrap_err(),
        ];
        for err in errors {
            assert_eq!(
                err.problem().code,
                codefleet_shared::ErrorCode::UnknownLanguage
            );
            assert!(
                err.problem().detail.contains("available: go, python"),
                "{err}"
            );
        }
        assert_eq!(snapshot.ready_nodes, 2);
        assert_eq!(snapshot.table.nodes().len(), 2);
    }

    /// An image built but whose version is still being read is not served yet (the agent does
    /// not run it): neither counted ready nor a routing candidate. A cluster once saw a job
    /// routed away from its primary because the primary's newer runtime had no version yet.
    #[test]
    fn a_runtime_without_its_version_yet_is_not_served() {
        let (mut m, t0) = (membership(), Instant::now());
        let reading = [
            ("python", "python/python-3.13", ""),
            ("python", "python/python", "3.11.2"),
        ];
        m.report(with_runtimes("a", &reading), t0).unwrap();
        let snapshot = m.snapshot(&Snapshot::empty(160));
        let listed: Vec<(&str, u32)> = snapshot
            .catalog
            .languages()
            .map(|l| (l.version.as_str(), l.nodes_ready))
            .collect();
        assert_eq!(listed, [("3.11.2", 1)]);
        let node = &snapshot.table.nodes()[0];
        assert_eq!(
            node.languages["python"],
            [("python/python".to_string(), "3.11.2".to_string())]
        );
    }

    fn with_runtimes(id: &str, runtimes: &[(&str, &str, &str)]) -> CapacityReport {
        use codefleet_shared::cluster::RuntimeCapacity;
        let mut r = report(id, 0);
        r.runtimes = runtimes
            .iter()
            .map(|(name, runtime, version)| RuntimeCapacity {
                name: name.to_string(),
                runtime: runtime.to_string(),
                capacity: python(version),
            })
            .collect();
        r
    }

    #[test]
    fn runtimes_merge_by_id_and_requests_resolve_to_the_newest_they_name() {
        let (mut m, t0) = (membership(), Instant::now());
        let both = [
            ("python", "python/python-3.13", "3.13.5"),
            ("python", "python/python", "3.11.2"),
        ];
        m.report(with_runtimes("a", &both), t0).unwrap();
        m.report(with_runtimes("b", &both[1..]), t0).unwrap();
        let snapshot = m.snapshot(&Snapshot::empty(160));
        let catalog = &snapshot.catalog;
        let listed: Vec<(&str, u32)> = catalog
            .languages()
            .map(|l| (l.version.as_str(), l.nodes_ready))
            .collect();
        assert_eq!(listed, [("3.13.5", 1), ("3.11.2", 2)]);
        let table: &[(Option<&str>, Option<&str>)] = &[
            (None, Some("python/python-3.13")),
            (Some("3"), Some("python/python-3.13")),
            (Some("3.13"), Some("python/python-3.13")),
            (Some("3.11"), Some("python/python")),
            (Some("3.1"), None),
        ];
        for (version, want) in table {
            let got = catalog
                .resolve_runtime("py", *version)
                .ok()
                .map(|(_, id)| id);
            assert_eq!(got, *want, "{version:?}");
        }
        let err = catalog.resolve("python", Some("3.1")).unwrap_err();
        assert!(
            err.problem().detail.contains("known: 3.13.5, 3.11.2"),
            "{err}"
        );
        // Only node a runs 3.13; both run 3.11, and node b runs it for any `3` it is asked.
        let nodes = |version: Option<&str>, runtime: &str| -> Vec<String> {
            let mut ids: Vec<String> = snapshot
                .table
                .nodes()
                .iter()
                .filter(|n| {
                    n.runtime_for("python", version)
                        .is_some_and(|(id, _)| id == runtime)
                })
                .map(|n| n.id.to_string())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(nodes(None, "python/python-3.13"), ["a"]);
        assert_eq!(nodes(Some("3.11"), "python/python"), ["a", "b"]);
        assert_eq!(nodes(None, "python/python"), ["b"]);
        assert_eq!(snapshot.table.nodes().len(), 2);
    }
}
