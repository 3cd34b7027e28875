//! Asynchronous submissions (`/v1/submissions`): an execute or judge request validated as the
//! synchronous endpoint would, stored, answered `202` with a token that names this node, then
//! run through the same job path when its turn comes; polled and cancelled by token.
//!
//! The store is one redb file per node id (`<state dir>/<node id>.redb`, made on the first
//! submission): an embedded, pure-Rust, ACID key-value store (every commit is durable before the
//! `202`), with no C to build and no server to run, maintained and at 3.x with a stable file
//! format (SQLite through rusqlite would compile SQLite's C in every build on these 2-core
//! machines; sled's file format is still beta). Records are JSON. What survives a restart
//! (or a `kill -9`): every submission accepted; one that was queued or running is queued again
//! in the order it came and run from the start (a run cut short leaves nothing behind: its
//! sandbox went with the agent); finished ones keep their result until they expire
//! (`--submission-ttl-s`, `--submission-max-stored`), and an expired token answers 404 saying
//! so; callbacks not yet delivered are delivered.
//!
//! Fairness with synchronous jobs: submissions take the same slots, waiting for one in line with
//! the jobs queued before them, but at most `--submission-concurrency` of them hold or wait for
//! a slot at once, so the other slots are always there for synchronous jobs.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use codefleet_shared::ids::{NodeId, SubmissionId};
use codefleet_shared::submission::{
    Submission, SubmissionRequest, SubmissionResult, SubmissionStatus,
};
use codefleet_shared::{ErrorCode, Problem};

use crate::agent::Agent;
use crate::callback::{self, Allowlist};
use crate::config::Config;
use crate::error::AgentError;
use crate::runner::{Target, Ticket};

/// token → a [`Record`] as JSON.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("submissions");
/// (finished at, token) of every finished record: what expires first comes first.
const FINISHED: TableDefinition<(u64, &str), ()> = TableDefinition::new("finished");
/// token → when it expired, and (expired at, token): what an expired token answers.
const EXPIRED: TableDefinition<&str, u64> = TableDefinition::new("expired");
const EXPIRED_ORDER: TableDefinition<(u64, &str), ()> = TableDefinition::new("expired_order");

/// How long a recovered submission waits for its language's image to be ready at most.
const IMAGE_WAIT: Duration = Duration::from_secs(900);

/// One submission as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Its place in line.
    seq: u64,
    submission: Submission,
    /// The request, until it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<SubmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback: Option<Callback>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Callback {
    url: String,
    state: CallbackState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum CallbackState {
    Pending,
    Delivered,
    Failed,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The redb file. Every method blocks: callers run them on the blocking pool.
struct Store {
    db: Database,
}

type StoreResult<T> = Result<T, redb::Error>;

fn decode(bytes: &[u8]) -> StoreResult<Record> {
    serde_json::from_slice(bytes).map_err(|e| redb::Error::Corrupted(format!("a record: {e}")))
}

fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record serializes")
}

impl Store {
    fn open(path: &Path) -> StoreResult<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(RECORDS)?;
        txn.open_table(FINISHED)?;
        txn.open_table(EXPIRED)?;
        txn.open_table(EXPIRED_ORDER)?;
        txn.commit()?;
        Ok(Store { db })
    }

    fn insert(&self, token: &str, record: &Record) -> StoreResult<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(RECORDS)?
            .insert(token, encode(record).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn get(&self, token: &str) -> StoreResult<Option<Record>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let found = table.get(token)?;
        found.map(|v| decode(v.value())).transpose()
    }

    fn expired_at(&self, token: &str) -> StoreResult<Option<u64>> {
        let txn = self.db.begin_read()?;
        let found = txn.open_table(EXPIRED)?.get(token)?;
        Ok(found.map(|v| v.value()))
    }

    /// Changes a record in one transaction: `change` says whether it changed anything. A record
    /// that becomes final joins the expiry order. Returns the record as it is after, and whether
    /// it changed; `None` when there is no such record.
    fn update(
        &self,
        token: &str,
        change: impl FnOnce(&mut Record) -> bool,
    ) -> StoreResult<Option<(Record, bool)>> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut records = txn.open_table(RECORDS)?;
            let found = records.get(token)?.map(|v| decode(v.value())).transpose()?;
            match found {
                None => None,
                Some(mut record) => {
                    let was_final = record.submission.status.is_final();
                    let changed = change(&mut record);
                    if changed {
                        records.insert(token, encode(&record).as_slice())?;
                        if !was_final && record.submission.status.is_final() {
                            let at = record.submission.finished_at_ms.unwrap_or_else(now_ms);
                            txn.open_table(FINISHED)?.insert((at, token), ())?;
                        }
                    }
                    Some((record, changed))
                }
            }
        };
        txn.commit()?;
        Ok(result)
    }

    /// Every record, in no particular order.
    fn all(&self) -> StoreResult<Vec<(String, Record)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut all = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            all.push((key.value().to_string(), decode(value.value())?));
        }
        Ok(all)
    }

    fn count(&self) -> StoreResult<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(RECORDS)?.len()?)
    }

    /// Removes the finished records older than `ttl` and, beyond `max` finished ones, the
    /// oldest; each leaves a tombstone (kept as long and as many). Returns how many expired.
    fn expire(&self, now: u64, ttl: u64, max: u64) -> StoreResult<usize> {
        let txn = self.db.begin_write()?;
        let mut expired = Vec::new();
        {
            let mut finished = txn.open_table(FINISHED)?;
            let count = finished.len()?;
            let mut over = count.saturating_sub(max);
            for entry in finished.iter()? {
                let (key, _) = entry?;
                let (at, token) = key.value();
                if over == 0 && now.saturating_sub(at) < ttl {
                    break;
                }
                over = over.saturating_sub(1);
                expired.push((at, token.to_string()));
            }
            let mut records = txn.open_table(RECORDS)?;
            let mut tombstones = txn.open_table(EXPIRED)?;
            let mut order = txn.open_table(EXPIRED_ORDER)?;
            for (at, token) in &expired {
                finished.remove((*at, token.as_str()))?;
                records.remove(token.as_str())?;
                tombstones.insert(token.as_str(), now)?;
                order.insert((now, token.as_str()), ())?;
            }
            // Tombstones go the same way, after as long again.
            let mut over = order.len()?.saturating_sub(max);
            let mut dropped = Vec::new();
            for entry in order.iter()? {
                let (key, _) = entry?;
                let (at, token) = key.value();
                if over == 0 && now.saturating_sub(at) < ttl {
                    break;
                }
                over = over.saturating_sub(1);
                dropped.push((at, token.to_string()));
            }
            for (at, token) in &dropped {
                order.remove((*at, token.as_str()))?;
                tombstones.remove(token.as_str())?;
            }
        }
        txn.commit()?;
        Ok(expired.len())
    }
}

/// The submissions this node keeps: the store, the line of queued ones, the running ones.
pub struct Submissions {
    node: String,
    path: PathBuf,
    store: Mutex<Option<Arc<Store>>>,
    /// Tokens waiting to run, in order.
    line: Mutex<VecDeque<String>>,
    /// Queued submissions (in `line`, or taken from it and not yet started).
    queued: AtomicU32,
    wake: Notify,
    /// Running submissions, each with what cancels it.
    running: Mutex<HashMap<String, CancellationToken>>,
    next_seq: AtomicU64,
    stored: AtomicU64,
    queue_length: u32,
    concurrency: u32,
    ttl: Duration,
    max_stored: u64,
    allow: Allowlist,
    sender: callback::Sender,
    /// Cancelled at shutdown: running submissions stop (and run again at the next start).
    stop: CancellationToken,
    /// Set once the store has been read at start: a new submission waits for it, so it is not
    /// also taken for a recovered one.
    recovered: tokio::sync::watch::Sender<bool>,
}

impl Submissions {
    pub fn new(config: &Config) -> Submissions {
        let allow = Allowlist::new(&config.callback_allow);
        Submissions {
            node: config.node_id.clone(),
            path: config.submissions_path(),
            store: Mutex::new(None),
            line: Mutex::new(VecDeque::new()),
            queued: AtomicU32::new(0),
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            queue_length: config.submission_queue_length,
            concurrency: config.submission_concurrency(),
            ttl: Duration::from_secs(config.submission_ttl_s),
            max_stored: config.submission_max_stored,
            sender: callback::Sender {
                secret: config.callback_secret.clone(),
                allow: allow.clone(),
                attempts: config.callback_attempts,
                backoff: Duration::from_millis(config.callback_backoff_ms),
                timeout: Duration::from_millis(config.callback_timeout_ms),
            },
            allow,
            stop: CancellationToken::new(),
            recovered: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Submissions queued, running, and kept in the store.
    pub fn counts(&self) -> (u32, usize, u64) {
        (
            self.queued.load(Ordering::SeqCst),
            self.running.lock().expect("running").len(),
            self.stored.load(Ordering::SeqCst),
        )
    }

    fn publish(&self) {
        let (queued, running, stored) = self.counts();
        metrics::gauge!("codefleet_submissions_queued").set(f64::from(queued));
        metrics::gauge!("codefleet_submissions_running").set(running as f64);
        metrics::gauge!("codefleet_submissions_stored").set(stored as f64);
    }

    /// The store, opened (and made, when `create`) on first use.
    fn store(&self, create: bool) -> StoreResult<Option<Arc<Store>>> {
        let mut slot = self.store.lock().expect("store");
        if slot.is_none() && (create || self.path.exists()) {
            *slot = Some(Arc::new(Store::open(&self.path)?));
        }
        Ok(slot.clone())
    }

    /// Runs `f` on the store on the blocking pool; `None` when there is no store (and `create`
    /// is false).
    async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        create: bool,
        f: impl FnOnce(&Store) -> StoreResult<T> + Send + 'static,
    ) -> Result<Option<T>, Problem> {
        let this = self.clone();
        let joined = tokio::task::spawn_blocking(move || match this.store(create)? {
            Some(store) => f(&store).map(Some),
            None => Ok(None),
        })
        .await;
        let failed = |why: String| {
            metrics::counter!("codefleet_internal_errors_total", "cause" => "submission_store")
                .increment(1);
            tracing::error!(error = %why, path = %self.path.display(), "the submissions store failed");
            Problem::new(
                ErrorCode::Internal,
                format!("the submissions store failed: {why}"),
            )
        };
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Checks a submission's `callback_url` (400 when refused).
    pub fn check_callback(&self, url: &str) -> Result<(), Problem> {
        if self.sender.secret.is_none() {
            return Err(Problem::new(
                ErrorCode::InvalidRequest,
                format!(
                    "callback_url: callbacks are off on node {} (it has no --callback-secret to sign them)",
                    self.node
                ),
            ));
        }
        callback::check_url(url, &self.allow).map(|_| ())
    }

    /// Stores a validated request as queued and puts it in line; its token names `node`.
    async fn accept(
        self: &Arc<Self>,
        request: SubmissionRequest,
        kind: &str,
        request_id: Option<String>,
    ) -> Result<Submission, AgentError> {
        let _ = self.recovered.subscribe().wait_for(|done| *done).await;
        let length = self.queue_length;
        let reserved = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < length).then_some(n + 1)
            });
        if reserved.is_err() {
            metrics::counter!("codefleet_queue_rejections_total").increment(1);
            return Err(AgentError::unavailable(
                Problem::new(
                    ErrorCode::NoCapacity,
                    format!(
                        "node {} holds {length} queued submissions already",
                        self.node
                    ),
                )
                .with_retry_after(1),
            ));
        }
        let node = NodeId::parse(&self.node).expect("the config checked the node id");
        let token = SubmissionId::new(node, rand::random()).to_string();
        let submission = Submission {
            token: token.clone(),
            kind: kind.to_string(),
            status: SubmissionStatus::Queued,
            created_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            result: None,
            error: None,
        };
        let record = Record {
            seq: self.next_seq.fetch_add(1, Ordering::SeqCst),
            submission: submission.clone(),
            callback: request.callback_url.clone().map(|url| Callback {
                url,
                state: CallbackState::Pending,
                error: None,
            }),
            request: Some(request),
            request_id,
        };
        let key = token.clone();
        if let Err(problem) = self
            .with_store(true, move |store| store.insert(&key, &record))
            .await
        {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(AgentError::unavailable(problem));
        }
        self.stored.fetch_add(1, Ordering::SeqCst);
        self.line.lock().expect("line").push_back(token);
        self.wake.notify_one();
        self.publish();
        Ok(submission)
    }

    fn not_found(&self, token: &str) -> Problem {
        let elsewhere = SubmissionId::parse(token)
            .ok()
            .filter(|id| id.node.as_str() != self.node)
            .map(|id| format!(" (its token names node {})", id.node))
            .unwrap_or_default();
        Problem::new(
            ErrorCode::NotFound,
            format!("no submission {token:?} on node {}{elsewhere}", self.node),
        )
    }

    /// `GET /v1/submissions/{token}`.
    pub async fn get(self: &Arc<Self>, token: &str) -> Result<Submission, Problem> {
        let key = token.to_string();
        let found = self
            .with_store(false, move |store| {
                Ok(match store.get(&key)? {
                    Some(record) => Ok(record.submission),
                    None => Err(store.expired_at(&key)?),
                })
            })
            .await?;
        match found {
            Some(Ok(submission)) => Ok(submission),
            Some(Err(Some(expired_at))) => Err(Problem::new(
                ErrorCode::NotFound,
                format!(
                    "submission {token:?} has expired (at {expired_at} ms since the epoch): node {} keeps a finished submission {} s (--submission-ttl-s) and at most {} of them (--submission-max-stored)",
                    self.node,
                    self.ttl.as_secs(),
                    self.max_stored
                ),
            )),
            Some(Err(None)) | None => Err(self.not_found(token)),
        }
    }

    /// `DELETE /v1/submissions/{token}`: a queued submission will never run, a running one is
    /// killed (its sandbox removed); a finished one is answered as it is.
    pub async fn cancel(self: &Arc<Self>, token: &str) -> Result<Submission, Problem> {
        let key = token.to_string();
        let now = now_ms();
        let found = self
            .with_store(false, move |store| {
                store.update(&key, |record| {
                    if record.submission.status.is_final() {
                        return false;
                    }
                    record.submission.status = SubmissionStatus::Cancelled;
                    record.submission.finished_at_ms = Some(now);
                    record.request = None;
                    true
                })
            })
            .await?
            .flatten();
        let Some((record, changed)) = found else {
            return Err(self
                .get(token)
                .await
                .err()
                .unwrap_or_else(|| self.not_found(token)));
        };
        if changed {
            let mut line = self.line.lock().expect("line");
            let before = line.len();
            line.retain(|t| t != token);
            if line.len() < before {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
            drop(line);
            if let Some(cancel) = self.running.lock().expect("running").get(token) {
                cancel.cancel();
            }
            tracing::info!(submission = %token, "submission cancelled");
            self.publish();
        }
        Ok(record.submission)
    }

    /// The next token in line, when there is one.
    async fn next(&self) -> String {
        loop {
            if let Some(token) = self.line.lock().expect("line").pop_front() {
                return token;
            }
            self.wake.notified().await;
        }
    }

    /// Reads the store at start: queued and running submissions go back in line (in the order
    /// they came), callbacks not delivered are delivered again.
    async fn recover(self: &Arc<Self>) -> Result<Vec<(String, Record)>, Problem> {
        let recovered = self
            .with_store(false, |store| {
                let mut all = store.all()?;
                for (token, record) in all.iter_mut() {
                    if !record.submission.status.is_final() {
                        let reset = store.update(token, |r| {
                            r.submission.status = SubmissionStatus::Queued;
                            r.submission.started_at_ms = None;
                            true
                        })?;
                        if let Some((r, _)) = reset {
                            *record = r;
                        }
                    }
                }
                Ok((all, store.count()?))
            })
            .await?;
        let Some((mut all, count)) = recovered else {
            return Ok(Vec::new());
        };
        if all.is_empty() {
            return Ok(all);
        }
        all.sort_by_key(|(_, r)| r.seq);
        let next = all.last().map_or(0, |(_, r)| r.seq + 1);
        self.next_seq.store(next, Ordering::SeqCst);
        self.stored.store(count, Ordering::SeqCst);
        let mut line = self.line.lock().expect("line");
        for (token, record) in &all {
            if record.submission.status == SubmissionStatus::Queued {
                line.push_back(token.clone());
            }
        }
        let queued = line.len();
        self.queued.store(queued as u32, Ordering::SeqCst);
        drop(line);
        if !all.is_empty() {
            tracing::info!(node = %self.node, stored = count, queued, "submissions recovered from the store");
        }
        self.wake.notify_one();
        self.publish();
        Ok(all)
    }

    /// Stops taking submissions from the line and cuts the running ones (they stay `running`
    /// in the store and run again from the start at the next start).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits (at most `within`) until no submission runs.
    pub async fn settle(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.running.lock().expect("running").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a finished submission's callback, and records how that went.
    fn deliver(self: &Arc<Self>, token: String, url: String, submission: Submission) {
        let this = self.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&submission).expect("a submission serializes");
            let outcome = tokio::select! {
                outcome = this.sender.deliver(&url, &token, &body) => outcome,
                () = this.stop.cancelled() => return,
            };
            let (state, error) = match outcome {
                Ok(()) => (CallbackState::Delivered, None),
                Err(failure) => {
                    tracing::warn!(submission = %token, %url, error = %failure.detail, "callback not delivered");
                    (CallbackState::Failed, Some(failure.detail))
                }
            };
            let key = token.clone();
            let _ = this
                .with_store(false, move |store| {
                    store.update(&key, |record| match &mut record.callback {
                        Some(callback) => {
                            callback.state = state;
                            callback.error = error;
                            true
                        }
                        None => false,
                    })
                })
                .await;
        });
    }

    /// Records the end of a running submission (unless a cancel came first); then its callback.
    async fn finish(self: &Arc<Self>, token: &str, outcome: Result<SubmissionResult, Problem>) {
        let key = token.to_string();
        let now = now_ms();
        let finished = self
            .with_store(false, move |store| {
                store.update(&key, |record| {
                    if record.submission.status != SubmissionStatus::Running {
                        return false;
                    }
                    let s = &mut record.submission;
                    s.finished_at_ms = Some(now);
                    match outcome {
                        Ok(result) => {
                            s.status = SubmissionStatus::Done;
                            s.result = Some(result);
                        }
                        Err(problem) => {
                            s.status = SubmissionStatus::Failed;
                            s.error = Some(problem);
                        }
                    }
                    record.request = None;
                    true
                })
            })
            .await;
        match finished {
            Ok(Some(Some((record, true)))) => {
                metrics::counter!("codefleet_submissions_finished_total", "status" => status_name(record.submission.status)).increment(1);
                if let Some(callback) = record.callback {
                    self.deliver(token.to_string(), callback.url, record.submission);
                }
            }
            Ok(_) => {}
            Err(problem) => {
                tracing::error!(submission = %token, error = %problem.detail, "a finished submission could not be stored")
            }
        }
    }

    /// Removes what has expired, now and then.
    async fn expire_loop(self: Arc<Self>) {
        let every = (self.ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.stop.cancelled() => return,
            }
            let ttl = self.ttl.as_millis() as u64;
            let max = self.max_stored;
            let expired = self
                .with_store(false, move |store| {
                    let n = store.expire(now_ms(), ttl, max)?;
                    Ok((n, store.count()?))
                })
                .await;
            if let Ok(Some((n, count))) = expired {
                self.stored.store(count, Ordering::SeqCst);
                if n > 0 {
                    tracing::debug!(expired = n, "submissions expired");
                    self.publish();
                }
            }
        }
    }
}

fn status_name(status: SubmissionStatus) -> &'static str {
    match status {
        SubmissionStatus::Queued => "queued",
        SubmissionStatus::Running => "running",
        SubmissionStatus::Done => "done",
        SubmissionStatus::Failed => "failed",
        SubmissionStatus::Cancelled => "cancelled",
    }
}

impl Agent {
    /// `POST /v1/submissions`: validated completely (exactly as `/v1/execute` or `/v1/judge`
    /// would, and the callback), then stored and queued; nothing is stored for a rejected one.
    pub async fn submit(
        &self,
        request: SubmissionRequest,
        request_id: Option<String>,
    ) -> Result<Submission, AgentError> {
        let kind = match (&request.execute, &request.judge) {
            (Some(execute), None) => {
                self.prepare(execute)?;
                "execute"
            }
            (None, Some(judge)) => {
                self.prepare_judge(judge)?;
                "judge"
            }
            _ => {
                return Err(Problem::new(
                    ErrorCode::InvalidRequest,
                    "a submission holds exactly one of `execute` and `judge`",
                )
                .into())
            }
        };
        if let Some(url) = &request.callback_url {
            self.submissions().check_callback(url)?;
        }
        if let Some(refusal) = self.lifecycle().refusal(self.node()) {
            return Err(AgentError::unavailable(refusal));
        }
        self.submissions().accept(request, kind, request_id).await
    }

    /// Runs one submission taken from the line, holding one of the submissions' turns.
    async fn run_submission(
        self: Arc<Self>,
        token: String,
        _turn: tokio::sync::OwnedSemaphorePermit,
    ) {
        let subs = self.submissions().clone();
        let _ = subs
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        let cancel = subs.stop.child_token();
        subs.running
            .lock()
            .expect("running")
            .insert(token.clone(), cancel.clone());
        let started = now_ms();
        let key = token.clone();
        let begun = subs
            .with_store(false, move |store| {
                store.update(&key, |record| {
                    if record.submission.status != SubmissionStatus::Queued {
                        return false;
                    }
                    record.submission.status = SubmissionStatus::Running;
                    record.submission.started_at_ms = Some(started);
                    true
                })
            })
            .await;
        subs.publish();
        let record = match begun {
            Ok(Some(Some((record, true)))) => Some(record),
            _ => None,
        };
        let outcome = match record {
            Some(Record {
                request: Some(request),
                request_id,
                ..
            }) => tokio::select! {
                outcome = self.run_request(&request, request_id) => Some(outcome),
                () = cancel.cancelled() => None,
            },
            _ => None,
        };
        subs.running.lock().expect("running").remove(&token);
        if let Some(outcome) = outcome {
            subs.finish(&token, outcome).await;
        }
        subs.publish();
    }

    /// What the synchronous endpoint would have answered, or the node's problem.
    async fn run_request(
        &self,
        request: &SubmissionRequest,
        request_id: Option<String>,
    ) -> Result<SubmissionResult, Problem> {
        let received = Instant::now();
        if let Some(execute) = &request.execute {
            let prepared = once_ready(received, || self.prepare(execute)).await?;
            let slot = self.slots().take_background().await;
            let ticket = Ticket::new(received, request_id);
            let response = self
                .runner()
                .run(slot, &prepared, Target::Pool, &ticket, None)
                .await
                .map_err(|e| e.problem)?;
            return Ok(SubmissionResult::Execute(Box::new(response)));
        }
        let judge = request.judge.as_ref().ok_or_else(|| {
            Problem::new(ErrorCode::InvalidRequest, "neither `execute` nor `judge`")
        })?;
        let prepared = once_ready(received, || self.prepare_judge(judge)).await?;
        let slot = self.slots().take_background().await;
        let ticket = Ticket::new(received, request_id);
        let response = self
            .judge(slot, &prepared, &ticket, None)
            .await
            .map_err(|e| e.problem)?;
        Ok(SubmissionResult::Judge(Box::new(response)))
    }
}

/// Validates a stored request again when it runs: a recovered submission may come before its
/// language's image is ready again, so `language_unavailable` is waited out (for a while).
async fn once_ready<T>(
    since: Instant,
    prepare: impl Fn() -> Result<T, Problem>,
) -> Result<T, Problem> {
    loop {
        match prepare() {
            Err(p) if p.code == ErrorCode::LanguageUnavailable && since.elapsed() < IMAGE_WAIT => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            other => return other,
        }
    }
}

/// The submissions' part of a running agent: recovery from the store, then taking queued
/// submissions in order as turns (`--submission-concurrency`) free up while the node takes
/// work, and expiry. Ends at shutdown.
pub async fn run_loop(agent: Arc<Agent>) {
    let subs = agent.submissions().clone();
    let recovered = subs.recover().await;
    subs.recovered.send_replace(true);
    match recovered {
        Ok(all) => {
            for (token, record) in all {
                let pending = record
                    .callback
                    .filter(|c| c.state == CallbackState::Pending);
                if let (Some(callback), true) = (pending, record.submission.status.is_final()) {
                    if record.submission.status != SubmissionStatus::Cancelled {
                        subs.deliver(token, callback.url, record.submission);
                    }
                }
            }
        }
        Err(problem) => {
            tracing::error!(error = %problem.detail, "could not read the submissions store");
        }
    }
    tokio::spawn(subs.clone().expire_loop());
    let turns = Arc::new(Semaphore::new(subs.concurrency as usize));
    loop {
        let turn = tokio::select! {
            turn = turns.clone().acquire_owned() => turn.expect("never closed"),
            () = subs.stop.cancelled() => return,
        };
        while !agent.is_ready() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = subs.stop.cancelled() => return,
            }
        }
        let token = tokio::select! {
            token = subs.next() => token,
            () = subs.stop.cancelled() => return,
        };
        tokio::spawn(agent.clone().run_submission(token, turn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, status: SubmissionStatus) -> Record {
        Record {
            seq,
            submission: Submission {
                token: format!("sb_{seq}.n1"),
                kind: "execute".to_string(),
                status,
                created_at_ms: seq,
                started_at_ms: None,
                finished_at_ms: None,
                result: None,
                error: None,
            },
            request: Some(SubmissionRequest::default()),
            request_id: None,
            callback: None,
        }
    }

    fn finish(store: &Store, token: &str, at: u64) {
        let changed = store.update(token, |r| {
            r.submission.status = SubmissionStatus::Done;
            r.submission.finished_at_ms = Some(at);
            r.request = None;
            true
        });
        assert!(changed.unwrap().unwrap().1);
    }

    /// Finished records expire by age and beyond the count cap, oldest first, each leaving a
    /// tombstone; unfinished ones never expire; all of it is still there after a reopen.
    #[test]
    fn the_store_expires_finished_records_only_and_remembers_them() {
        let dir = std::env::temp_dir().join(format!("codefleet-store-test-{}", std::process::id()));
        let path = dir.join("n1.redb");
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&path).unwrap();
            for seq in 0..5 {
                store
                    .insert(
                        &format!("sb_{seq}.n1"),
                        &record(seq, SubmissionStatus::Queued),
                    )
                    .unwrap();
            }
            finish(&store, "sb_0.n1", 1_000);
            finish(&store, "sb_1.n1", 2_000);
            finish(&store, "sb_2.n1", 3_000);
            // A final record does not change again through a guarded update.
            let again = store
                .update("sb_0.n1", |r| !r.submission.status.is_final())
                .unwrap();
            assert!(!again.unwrap().1);
            // Age: older than 1.5 s at 3.6 s.
            assert_eq!(store.expire(3_600, 1_500, 100).unwrap(), 2);
            assert!(store.get("sb_0.n1").unwrap().is_none());
            assert_eq!(store.expired_at("sb_1.n1").unwrap(), Some(3_600));
            assert!(store.get("sb_2.n1").unwrap().is_some());
            assert_eq!(store.count().unwrap(), 3);
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.expired_at("sb_0.n1").unwrap(), Some(3_600));
        // Count: one finished kept at most; the queued ones stay whatever the cap.
        finish(&store, "sb_3.n1", 4_000);
        assert_eq!(store.expire(4_100, 60_000, 1).unwrap(), 1);
        assert!(store.get("sb_2.n1").unwrap().is_none());
        assert!(store.get("sb_3.n1").unwrap().is_some());
        let left: Vec<u64> = store.all().unwrap().iter().map(|(_, r)| r.seq).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(store.get("sb_4.n1").unwrap().unwrap().request.is_some());
        // Tombstones go too, once they are as old as the TTL again.
        store.expire(10_000, 1_000, 100).unwrap();
        assert_eq!(store.expired_at("sb_0.n1").unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The routes: `POST /v1/submissions`, `GET` and `DELETE /v1/submissions/{token}`.
pub mod http {
    use std::sync::Arc;

    use axum::extract::{Path, Request, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::Json;

    use codefleet_shared::submission::SubmissionRequest;

    use crate::agent::Agent;
    use crate::http::{read_json, request_id, ApiError};

    /// `202` with the stored submission, or the problem a synchronous request would get.
    pub async fn create(
        State(agent): State<Arc<Agent>>,
        request: Request,
    ) -> Result<Response, ApiError> {
        let id = request_id(&request);
        let body: SubmissionRequest = read_json(&agent, request).await?;
        let submission = agent.submit(body, id).await?;
        tracing::info!(node = %agent.node(), submission = %submission.token, kind = %submission.kind, "submission accepted");
        Ok((StatusCode::ACCEPTED, Json(submission)).into_response())
    }

    pub async fn get(
        State(agent): State<Arc<Agent>>,
        Path(token): Path<String>,
    ) -> Result<Response, ApiError> {
        let submission = agent.submissions().get(&token).await?;
        Ok(Json(submission).into_response())
    }

    pub async fn cancel(
        State(agent): State<Arc<Agent>>,
        Path(token): Path<String>,
    ) -> Result<Response, ApiError> {
        let submission = agent.submissions().cancel(&token).await?;
        Ok(Json(submission).into_response())
    }
}
