//! Messages between node agents and gateways: the capacity report an agent serves at
//! `GET /v1/capacity` and pushes to every gateway it knows (`POST /v1/internal/reports`), and the
//! node view the gateway serves at `GET /v1/nodes`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::ImageState;

/// Request header from a gateway to an agent: the most milliseconds the job may wait in the
/// agent's queue for a slot (what is left of the gateway's own wait).
pub const QUEUE_WAIT_HEADER: &str = "x-codefleet-queue-wait-ms";

/// Response header from an agent on an error answer when the job certainly did not start (no
/// sandbox accepted it): the gateway may send it to another node. Absent means it may have run.
pub const NOT_STARTED_HEADER: &str = "x-codefleet-not-started";

/// What one language looks like on one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LanguageCapacity {
    pub image: ImageState,
    /// Ready warm sandboxes for this language (recycled and fresh).
    pub warm: u32,
    /// Version read from the image; empty until the image is ready.
    pub version: String,
    pub aliases: Vec<String>,
    pub compiled: bool,
    pub file_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An agent's report of itself. The first one a gateway receives registers the node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CapacityReport {
    pub node_id: String,
    /// Base URL at which gateways reach this agent, e.g. `http://127.0.0.1:7001`.
    pub address: String,
    pub slots_total: u32,
    pub slots_busy: u32,
    /// Jobs waiting for a slot on the agent.
    #[serde(default)]
    pub queued: u32,
    pub draining: bool,
    /// False while the agent can run nothing new for a reason other than draining (its Docker
    /// engine does not answer); gateways then treat the node as down.
    #[serde(default = "yes")]
    pub ready: bool,
    /// One entry per language name: its default runtime (the newest ready one), as gateways of
    /// the version before runtimes read it.
    pub languages: BTreeMap<String, LanguageCapacity>,
    #[serde(default)]
    pub sessions: u32,
    /// Every runtime (one language at one version in one image), newest first within a
    /// language. Absent in the reports of agents from before runtimes: [`CapacityReport::all_runtimes`]
    /// then reads `languages`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<RuntimeCapacity>,
    /// Bytes of disk the node's runtime images take (layers shared between images counted in
    /// each); absent until the agent measured it, and in older agents' reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
}

/// What one runtime looks like on one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeCapacity {
    /// The language's canonical name.
    pub name: String,
    /// The runtime's id on its node (`python/python-3.13`: the language and its image's
    /// recipe), the same on nodes of the same catalog; what gateways merge nodes' runtimes by.
    pub runtime: String,
    #[serde(flatten)]
    pub capacity: LanguageCapacity,
}

impl CapacityReport {
    /// Every runtime as (language name, runtime id, capacity): `runtimes`, or one per entry of
    /// `languages` (with the id `""`) in a report that has no `runtimes`.
    pub fn all_runtimes(&self) -> Vec<(&str, &str, &LanguageCapacity)> {
        if self.runtimes.is_empty() {
            self.languages
                .iter()
                .map(|(name, l)| (name.as_str(), "", l))
                .collect()
        } else {
            self.runtimes
                .iter()
                .map(|r| (r.name.as_str(), r.runtime.as_str(), &r.capacity))
                .collect()
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Draining,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeLanguage {
    pub image: ImageState,
    pub warm: u32,
}

/// One entry of the gateway's `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub state: NodeState,
    pub slots_total: u32,
    pub slots_busy: u32,
    /// Fraction of the ring's keys this node owns (0..1).
    pub ring_share: f64,
    pub languages: BTreeMap<String, NodeLanguage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python(version: &str) -> LanguageCapacity {
        LanguageCapacity {
            image: ImageState::Ready,
            warm: 1,
            version: version.into(),
            aliases: vec!["py".into()],
            compiled: false,
            file_name: "main.py".into(),
            error: None,
        }
    }

    #[test]
    fn a_report_keeps_languages_by_name_beside_its_runtimes_and_old_reports_still_read() {
        let report = CapacityReport {
            node_id: "n1".into(),
            address: "http://127.0.0.1:7001".into(),
            slots_total: 2,
            slots_busy: 0,
            queued: 0,
            draining: false,
            ready: true,
            languages: [("python".to_string(), python("3.13.5"))].into(),
            sessions: 0,
            runtimes: ["3.13.5", "3.11.2"]
                .iter()
                .zip(["python/python-3.13", "python/python"])
                .map(|(v, id)| RuntimeCapacity {
                    name: "python".into(),
                    runtime: id.into(),
                    capacity: python(v),
                })
                .collect(),
            image_bytes: None,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["languages"]["python"]["version"], "3.13.5");
        assert_eq!(json["runtimes"][1]["version"], "3.11.2");
        assert_eq!(json["runtimes"][1]["runtime"], "python/python");
        let back: CapacityReport = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, report);
        let ids: Vec<&str> = back.all_runtimes().iter().map(|r| r.1).collect();
        assert_eq!(ids, ["python/python-3.13", "python/python"]);

        // A report from an agent before runtimes: one runtime per language, id "".
        let mut old = json;
        old.as_object_mut().unwrap().remove("runtimes");
        let old: CapacityReport = serde_json::from_value(old).unwrap();
        let runtimes = old.all_runtimes();
        assert_eq!(runtimes.len(), 1);
        assert_eq!((runtimes[0].0, runtimes[0].1), ("python", ""));
        assert_eq!(runtimes[0].2.version, "3.13.5");
    }
}
