//! The agent's one error type: whose fault (the caller's or the node's) and whether the job may
//! have started. `http` maps it to problem+json in one place; a node's error for a job that
//! certainly did not start carries `x-codefleet-not-started`, so a gateway may run it elsewhere.

use codefleet_shared::{ErrorCode, Problem};

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request is wrong (4xx): another node would refuse it too.
    Caller,
    /// The node cannot serve it (5xx): full, draining, its engine unreachable, a language not
    /// ready, or it failed.
    Node,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .problem.detail)]
pub struct AgentError {
    pub problem: Problem,
    pub fault: Fault,
    /// Whether a sandbox may have run any of the job.
    pub started: bool,
}

impl AgentError {
    /// The node failed a job a sandbox had taken: not safe to run again elsewhere.
    pub fn after_start(problem: Problem) -> AgentError {
        AgentError {
            fault: Fault::Node,
            started: true,
            problem,
        }
    }

    /// The node cannot take the job (nothing of it ran).
    pub fn unavailable(problem: Problem) -> AgentError {
        AgentError {
            fault: Fault::Node,
            started: false,
            problem,
        }
    }

    /// Whether a gateway may send the job to another node: the node's fault, before any
    /// sandbox took it.
    pub fn retry_elsewhere(&self) -> bool {
        self.fault == Fault::Node && !self.started
    }

    pub fn code(&self) -> ErrorCode {
        self.problem.code
    }
}

/// A problem found before anything ran: the caller's for a 4xx, the node's for a 5xx.
impl From<Problem> for AgentError {
    fn from(problem: Problem) -> AgentError {
        let fault = if problem.status >= 500 {
            Fault::Node
        } else {
            Fault::Caller
        };
        AgentError {
            problem,
            fault,
            started: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_errors_before_a_start_may_go_elsewhere() {
        let table = [
            (
                AgentError::from(Problem::new(ErrorCode::InvalidRequest, "x")),
                false,
            ),
            (
                AgentError::from(Problem::new(ErrorCode::NotFound, "x")),
                false,
            ),
            (
                AgentError::from(Problem::new(ErrorCode::NoCapacity, "x")),
                true,
            ),
            (
                AgentError::from(Problem::new(ErrorCode::LanguageUnavailable, "x")),
                true,
            ),
            (
                AgentError::unavailable(Problem::new(ErrorCode::NoCapacity, "x")),
                true,
            ),
            (
                AgentError::after_start(Problem::new(ErrorCode::Internal, "x")),
                false,
            ),
        ];
        for (error, elsewhere) in table {
            assert_eq!(error.retry_elsewhere(), elsewhere, "{error:?}");
        }
    }
}
