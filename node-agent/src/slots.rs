//! Job slots: at most `--slots` jobs run at once; more wait in a bounded queue (length and time)
//! or are refused at once, so a burst queues and an overload sheds without piling up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use codefleet_shared::{ErrorCode, Problem};

pub struct Slots {
    total: u32,
    node: String,
    queue_length: u32,
    queue_wait: Duration,
    semaphore: Arc<Semaphore>,
    busy: AtomicU32,
    queued: AtomicU32,
}

/// A slot held by one job; freed on drop.
pub struct Slot {
    slots: Arc<Slots>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One job waiting for a slot; counted in the queue until dropped, however the wait ends (a
/// cancelled request included).
struct Queued<'a> {
    slots: &'a Slots,
}

impl<'a> Queued<'a> {
    /// Joins the queue, unless it is full.
    fn join(slots: &'a Slots) -> Option<Queued<'a>> {
        let max = slots.queue_length;
        let joined = slots
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            });
        let depth = joined.ok()? + 1;
        metrics::gauge!("codefleet_queue_depth").set(f64::from(depth));
        Some(Queued { slots })
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let depth = self.slots.queued.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("codefleet_queue_depth").set(f64::from(depth));
    }
}

impl Slots {
    pub fn new(total: u32, queue_length: u32, queue_wait: Duration, node: &str) -> Slots {
        Slots {
            total,
            node: node.to_string(),
            queue_length,
            queue_wait,
            semaphore: Arc::new(Semaphore::new(total as usize)),
            busy: AtomicU32::new(0),
            queued: AtomicU32::new(0),
        }
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn busy(&self) -> u32 {
        self.busy.load(Ordering::SeqCst)
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Takes a free slot, or queues for one: at most `wait` (bounded by `--queue-wait-ms`), and
    /// only while fewer than `--queue-length` jobs wait already.
    pub async fn take(self: &Arc<Self>, wait: Option<Duration>) -> Result<Slot, Problem> {
        let started = Instant::now();
        let permit = match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let busy = |why: String| {
                    metrics::counter!("codefleet_queue_rejections_total").increment(1);
                    Problem::new(ErrorCode::NoCapacity, why).with_retry_after(1)
                };
                let Some(_waiting) = Queued::join(self) else {
                    return Err(busy(format!(
                        "all {} slots of node {} are busy and {} jobs wait already",
                        self.total, self.node, self.queue_length
                    )));
                };
                let wait = wait.map_or(self.queue_wait, |w| w.min(self.queue_wait));
                match tokio::time::timeout(wait, self.semaphore.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(busy(format!(
                            "all {} slots of node {} stayed busy for {} ms",
                            self.total,
                            self.node,
                            wait.as_millis()
                        )))
                    }
                }
            }
        };
        metrics::histogram!("codefleet_queue_wait_seconds").record(started.elapsed().as_secs_f64());
        self.busy.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            slots: self.clone(),
            _permit: permit,
        })
    }
}

impl Slots {
    /// Waits for a slot however long it takes, outside the bounded queue (which is for callers
    /// holding a connection open): a stored submission's turn. Waiters are served in order, so
    /// it takes its place in line with the jobs queued before it.
    pub async fn take_background(self: &Arc<Self>) -> Slot {
        let permit = self
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        self.busy.fetch_add(1, Ordering::SeqCst);
        Slot {
            slots: self.clone(),
            _permit: permit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Free slots are taken at once; then jobs queue (up to the queue's length, for at most
    /// the wait) and get a slot as one is freed; beyond the length they are refused at once.
    #[tokio::test]
    async fn a_full_node_queues_boundedly_then_refuses() {
        let slots = Arc::new(Slots::new(1, 1, Duration::from_secs(5), "n1"));
        let first = slots.take(None).await.expect("a free slot");
        assert_eq!((slots.busy(), slots.queued()), (1, 0));

        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take(None).await.map(|_| ()) }
        });
        while slots.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = slots.take(None).await.err().expect("the queue is full");
        assert_eq!(refused.code, ErrorCode::NoCapacity);
        assert!(
            refused.detail.contains("jobs wait already"),
            "{}",
            refused.detail
        );

        drop(first);
        waiting
            .await
            .unwrap()
            .expect("the waiting job got the freed slot");
        assert_eq!((slots.busy(), slots.queued()), (0, 0));

        let held = slots.take(None).await.unwrap();
        let started = Instant::now();
        let timed_out = slots.take(Some(Duration::from_millis(50))).await.err();
        assert!(timed_out.unwrap().detail.contains("stayed busy for 50 ms"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the caller's wait, not the node's"
        );
        drop(held);
    }
}
