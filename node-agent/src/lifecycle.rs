//! The node's lifecycle flags: whether its Docker engine answers, whether the orphans of an
//! earlier run are gone (so containers may be created), and whether it drains.

use std::sync::atomic::{AtomicBool, Ordering};

use codefleet_shared::{ErrorCode, Problem};

#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    docker_ok: AtomicBool,
    started: AtomicBool,
}

impl Lifecycle {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// No new work from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn docker_ok(&self) -> bool {
        self.docker_ok.load(Ordering::SeqCst)
    }

    /// Records whether the engine answers; returns whether that changed.
    pub fn set_docker_ok(&self, ok: bool) -> bool {
        self.docker_ok.swap(ok, Ordering::SeqCst) != ok
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// The orphans of an earlier run are gone: containers may be created.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Running and reachable (what a capacity report calls `ready`), draining or not.
    pub fn up(&self) -> bool {
        self.docker_ok() && self.started()
    }

    /// Ready for new work.
    pub fn is_ready(&self) -> bool {
        self.up() && !self.draining()
    }

    /// Why new work is refused, if it is (`node` names this node in the message).
    pub fn refusal(&self, node: &str) -> Option<Problem> {
        if self.draining() {
            return Some(Problem::new(
                ErrorCode::NoCapacity,
                format!("node {node} is draining"),
            ));
        }
        (!self.docker_ok()).then(|| docker_unreachable(node))
    }
}

/// 503 for work that arrives while this node's Docker engine does not answer.
pub fn docker_unreachable(node: &str) -> Problem {
    Problem::new(
        ErrorCode::NoCapacity,
        format!("node {node} cannot reach its Docker engine"),
    )
    .with_retry_after(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_work_is_refused_until_started_and_reachable_and_while_draining() {
        let l = Lifecycle::default();
        assert!(!l.is_ready());
        assert!(l.refusal("n1").is_some(), "no engine yet");
        assert!(l.set_docker_ok(true));
        assert!(!l.set_docker_ok(true), "no change");
        assert!(l.refusal("n1").is_none());
        assert!(!l.is_ready(), "orphans not yet removed");
        l.set_started();
        assert!(l.is_ready() && l.up());
        l.drain();
        assert!(!l.is_ready() && l.up());
        assert!(l.refusal("n1").unwrap().detail.contains("draining"));
    }
}
