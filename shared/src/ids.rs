//! Node ids, session ids and submission tokens, parsed and formatted here only: a node id is
//! 1-64 of `A-Z a-z 0-9 _ -`; a session id is `se_<16 hex digits>.<node id>` and a submission
//! token `sb_<32 hex digits>.<node id>`, so any gateway can tell from the id alone which node
//! holds the session or the submission.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// What a node id may hold, in the words error messages use.
pub const NODE_ID_RULE: &str = "1-64 of A-Z a-z 0-9 _ -";

/// Why a string is not an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    NodeId,
    SessionId,
    SubmissionId,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::NodeId => write!(f, "a node id is {NODE_ID_RULE}"),
            IdError::SessionId => f.write_str("a session id is se_<letters, digits, _>.<node id>"),
            IdError::SubmissionId => {
                f.write_str("a submission token is sb_<letters, digits, _>.<node id>")
            }
        }
    }
}

impl std::error::Error for IdError {}

/// A node's id, checked: 1-64 of `A-Z a-z 0-9 _ -`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn parse(id: &str) -> Result<NodeId, IdError> {
        let ok = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match ok {
            true => Ok(NodeId(Arc::from(id))),
            false => Err(IdError::NodeId),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = IdError;

    fn from_str(id: &str) -> Result<NodeId, IdError> {
        NodeId::parse(id)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A session's id: `se_<key>.<node>`, where the node holds the session. An agent makes one
/// with [`SessionId::new`] and answers it as text; a gateway parses it to route to `node`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// `se_` and then letters, digits and `_` (16 hex digits in the ids agents make).
    key: String,
    pub node: NodeId,
}

impl SessionId {
    /// A new id on `node`; `random` makes it unguessable (the agent passes 64 random bits).
    pub fn new(node: NodeId, random: u64) -> SessionId {
        SessionId {
            key: format!("se_{random:016x}"),
            node,
        }
    }

    pub fn parse(id: &str) -> Result<SessionId, IdError> {
        let (key, node) = split_keyed(id, "se_").ok_or(IdError::SessionId)?;
        Ok(SessionId { key, node })
    }
}

impl FromStr for SessionId {
    type Err = IdError;

    fn from_str(id: &str) -> Result<SessionId, IdError> {
        SessionId::parse(id)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.key, self.node)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

/// `<prefix><letters, digits, _>.<node id>` split into its key and node.
fn split_keyed(id: &str, prefix: &str) -> Option<(String, NodeId)> {
    let (key, node) = id.split_once('.')?;
    let key_ok =
        key.starts_with(prefix) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !key_ok {
        return None;
    }
    Some((key.to_string(), NodeId::parse(node).ok()?))
}

/// A submission's token: `sb_<key>.<node>`, where the node keeps the submission. An agent makes
/// one with [`SubmissionId::new`]; a gateway parses it to send a poll or a cancel to `node`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SubmissionId {
    /// `sb_` and then letters, digits and `_` (32 hex digits in the tokens agents make).
    key: String,
    pub node: NodeId,
}

impl SubmissionId {
    /// A new token on `node`; `random` makes it unguessable (the agent passes 128 random bits).
    pub fn new(node: NodeId, random: u128) -> SubmissionId {
        SubmissionId {
            key: format!("sb_{random:032x}"),
            node,
        }
    }

    pub fn parse(id: &str) -> Result<SubmissionId, IdError> {
        let (key, node) = split_keyed(id, "sb_").ok_or(IdError::SubmissionId)?;
        Ok(SubmissionId { key, node })
    }
}

impl FromStr for SubmissionId {
    type Err = IdError;

    fn from_str(id: &str) -> Result<SubmissionId, IdError> {
        SubmissionId::parse(id)
    }
}

impl fmt::Display for SubmissionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.key, self.node)
    }
}

impl fmt::Debug for SubmissionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        let long = "a".repeat(64);
        let too_long = "a".repeat(65);
        let table: &[(&str, bool)] = &[
            ("n1", true),
            ("agent-1", true),
            ("dev-host_name-8080", true),
            ("A", true),
            (&long, true),
            (&too_long, false),
            ("", false),
            ("a.b", false),
            ("a b", false),
            ("a/b", false),
            ("é", false),
            ("n1\n", false),
        ];
        for (id, ok) in table {
            let parsed = NodeId::parse(id);
            assert_eq!(parsed.is_ok(), *ok, "{id:?}");
            if let Ok(node) = parsed {
                assert_eq!(node.as_str(), *id);
                assert_eq!(node.to_string(), *id);
            }
        }
        assert_eq!(
            NodeId::parse("a.b").unwrap_err().to_string(),
            "a node id is 1-64 of A-Z a-z 0-9 _ -"
        );
    }

    #[test]
    fn session_ids_parse_to_their_node() {
        let table: &[(&str, Option<&str>)] = &[
            ("se_0123456789abcdef.n1", Some("n1")),
            ("se_x.dev-host-8080", Some("dev-host-8080")),
            ("se_.n1", Some("n1")),
            ("se_0123.", None),
            ("se_0123", None),
            ("ex_0123.n1", None),
            ("se-0123.n1", None),
            ("se_01-23.n1", None),
            ("se_0123.n1.n2", None),
            ("se_0123.n/1", None),
            ("", None),
            (".n1", None),
        ];
        for (id, node) in table {
            let parsed = SessionId::parse(id).ok();
            assert_eq!(parsed.as_ref().map(|s| s.node.as_str()), *node, "{id:?}");
            if let Some(session) = parsed {
                assert_eq!(session.to_string(), *id, "round trip");
            }
        }
    }

    #[test]
    fn new_session_ids_round_trip() {
        let node = NodeId::parse("n-1").unwrap();
        for random in [0, 1, 0xdead_beef, u64::MAX] {
            let id = SessionId::new(node.clone(), random);
            let text = id.to_string();
            assert!(text.starts_with("se_") && text.ends_with(".n-1"), "{text}");
            assert_eq!(text.len(), "se_".len() + 16 + ".n-1".len(), "{text}");
            assert_eq!(SessionId::parse(&text), Ok(id));
        }
        assert_eq!(
            SessionId::new(node, 0xab).to_string(),
            "se_00000000000000ab.n-1"
        );
    }

    #[test]
    fn submission_tokens_name_their_node() {
        let node = NodeId::parse("n-1").unwrap();
        let token = SubmissionId::new(node, 0xab).to_string();
        assert_eq!(token, format!("sb_{:032x}.n-1", 0xab));
        assert_eq!(SubmissionId::parse(&token).unwrap().node.as_str(), "n-1");
        let table: &[(&str, Option<&str>)] = &[
            ("sb_00ff.agent-2", Some("agent-2")),
            ("se_00ff.agent-2", None),
            ("sb_00ff", None),
            ("sb_00-ff.n1", None),
            ("sb_00ff.n1.n2", None),
            ("sb_00ff.", None),
        ];
        for (id, node) in table {
            let parsed = SubmissionId::parse(id).ok();
            assert_eq!(parsed.as_ref().map(|s| s.node.as_str()), *node, "{id:?}");
            if let Some(parsed) = parsed {
                assert_eq!(parsed.to_string(), *id, "round trip");
            }
        }
    }
}
