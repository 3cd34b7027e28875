//! The wait line: jobs that found every node of their language full wait here, and leave in the
//! order they came (one line per language and version asked for). Only the first waiting job of a language looks for a node; a job that comes
//! while others of its language wait joins behind them instead of taking the next freed slot.
//! Without this, a slot freed under overload went to whichever job asked first after it was
//! freed, usually a newcomer, and jobs that had waited longest were the ones left to time out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

pub struct WaitLine {
    /// Tickets of the waiting jobs, per language, oldest first.
    lines: Mutex<HashMap<String, VecDeque<u64>>>,
    next: std::sync::atomic::AtomicU64,
    /// Notified when a slot may be free, and when the first job of a line leaves it.
    wake: Arc<Notify>,
}

impl WaitLine {
    pub fn new(wake: Arc<Notify>) -> WaitLine {
        WaitLine {
            lines: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            wake,
        }
    }

    /// Whether no job of `language` (the line's key) waits.
    pub fn is_empty(&self, language: &str) -> bool {
        self.lock().get(language).is_none_or(VecDeque::is_empty)
    }

    /// Puts a job of `language` at the back of its line; it leaves when the place drops.
    pub fn join(&self, language: &str) -> Place<'_> {
        let ticket = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock()
            .entry(language.to_string())
            .or_default()
            .push_back(ticket);
        Place {
            line: self,
            language: language.to_string(),
            ticket,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<u64>>> {
        self.lines.lock().expect("wait line lock")
    }
}

/// A job's place in its language's line.
pub struct Place<'a> {
    line: &'a WaitLine,
    language: String,
    ticket: u64,
}

impl Place<'_> {
    /// Whether no job of this language waits ahead of this one.
    pub fn is_first(&self) -> bool {
        self.line
            .lock()
            .get(&self.language)
            .and_then(|line| line.front())
            == Some(&self.ticket)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut lines = self.line.lock();
        let Some(line) = lines.get_mut(&self.language) else {
            return;
        };
        let was_first = line.front() == Some(&self.ticket);
        line.retain(|t| *t != self.ticket);
        let others = !line.is_empty();
        if !others {
            lines.remove(&self.language);
        }
        drop(lines);
        // The next job is first now: it looks for a node at once (there may be room left).
        if was_first && others {
            self.line.wake.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_of_a_language_leave_in_the_order_they_came() {
        let line = WaitLine::new(Arc::new(Notify::new()));
        assert!(line.is_empty("python"));
        let a = line.join("python");
        let b = line.join("python");
        let go = line.join("go");
        assert!(a.is_first() && !b.is_first());
        assert!(go.is_first(), "each language has its own line");
        assert!(!line.is_empty("python"));
        drop(a);
        assert!(b.is_first());
        drop(b);
        assert!(line.is_empty("python"));
        assert!(!line.is_empty("go"));
    }

    #[test]
    fn a_job_that_leaves_from_the_middle_keeps_the_order_of_the_rest() {
        let line = WaitLine::new(Arc::new(Notify::new()));
        let a = line.join("js");
        let b = line.join("js");
        let c = line.join("js");
        drop(b);
        assert!(a.is_first() && !c.is_first());
        drop(a);
        assert!(c.is_first());
    }

    #[tokio::test]
    async fn the_first_leaving_wakes_the_next() {
        let wake = Arc::new(Notify::new());
        let line = WaitLine::new(Arc::clone(&wake));
        let a = line.join("py");
        let b = line.join("py");
        let woken = wake.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("the next job is woken");
        assert!(b.is_first());
    }
}
