//! What the gateway's service and stream tests share: the capacity report a fake agent sends
//! (python ready, go preparing) and the ring's choice of node for python.

use codefleet_gateway::routing::{NodeEntry, NodeId, RoutingTable};
use codefleet_gateway::Config;
use codefleet_shared::cluster::{CapacityReport, LanguageCapacity};
use codefleet_shared::ImageState;

/// A report of node `id` at `address` with `slots`, `busy` of them busy.
pub fn capacity(id: &str, address: &str, slots: u32, busy: u32) -> CapacityReport {
    let python = LanguageCapacity {
        image: ImageState::Ready,
        warm: 2,
        version: "3.11.2".to_string(),
        aliases: vec!["py".to_string()],
        compiled: false,
        file_name: "main.py".to_string(),
        error: None,
    };
    let go = LanguageCapacity {
        image: ImageState::Preparing,
        version: String::new(),
        aliases: vec![],
        compiled: true,
        file_name: "main.go".to_string(),
        ..python.clone()
    };
    CapacityReport {
        node_id: id.to_string(),
        address: address.to_string(),
        slots_total: slots,
        slots_busy: busy,
        queued: 0,
        ready: true,
        draining: false,
        languages: [("python".to_string(), python), ("go".to_string(), go)].into(),
        sessions: 0,
        runtimes: vec![],
        image_bytes: None,
    }
}

/// The primary owner of `python` among `ids`, as every gateway computes it.
fn primary(ids: &[&str]) -> String {
    let entries = ids
        .iter()
        .map(|id| NodeEntry {
            id: NodeId::new(id),
            slots_total: 1,
            languages: Default::default(),
            load: (),
        })
        .collect();
    let table = RoutingTable::new(Config::default().vnodes, entries);
    table.primary("python").unwrap().to_string()
}

/// Two node ids: the primary for python first.
pub fn ids() -> (&'static str, &'static str) {
    match primary(&["a", "b"]).as_str() {
        "a" => ("a", "b"),
        _ => ("b", "a"),
    }
}
