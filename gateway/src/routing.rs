//! Routing: which node runs a job. Bounded-load consistent hashing over an immutable snapshot of
//! the nodes that take new work; a pure function of (request, snapshot, loads): no I/O, no clock.
//!
//! The ring is keyed by language (not by runtime), so each language's images and warm sandboxes,
//! those of all its runtimes, stay on few nodes.
//! A job goes to the first node in the key's preference order (`Ring::replicas`) that has the
//! language ready, a free slot, and a load under the bound `ceil(c * (total + 1) / n)` over the
//! `n` candidates (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads").
//! The bound always leaves at least one candidate under it, so with free slots everywhere no node
//! ends above `c` times the average.
//!
//! A compiled program may carry a secondary key, its *affinity* (a hash of the program's files,
//! [`program_affinity`]): its walk is then the ring's order for that key instead of the
//! language's, over the same candidates and under the same bound, so the same program goes to
//! the same node, the one holding it in its compile cache, while that node has room, and spills
//! along an order of its own when it has not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use codefleet_shared::version::{compare_versions, version_matches};
use consistent_hash_ring::{Ring, RingBuilder};

/// A node's id as a ring key (checked by `codefleet_shared::ids::NodeId` where it comes in).
/// Hashes as its bytes and nothing else, so every gateway builds the same ring.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(id: &str) -> NodeId {
        NodeId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Hash for NodeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
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

/// A routing key: a language name, hashed as its bytes, or a program's affinity.
enum Key<'a> {
    Language(&'a str),
    Program(u64),
}

impl Hash for Key<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Key::Language(name) => state.write(name.as_bytes()),
            // `~` is outside the characters of a language name: no language hashes the same.
            Key::Program(affinity) => {
                state.write(b"~program~");
                state.write(&affinity.to_le_bytes());
            }
        }
    }
}

/// A program's affinity for `language`: a hash of its `source`, or of each file's name,
/// encoding and content. The same bytes give the same key on every gateway.
pub fn program_affinity(language: &str, request: &codefleet_shared::ExecuteRequest) -> u64 {
    let mut hasher = RingHasher::default();
    let mut part = |bytes: &[u8]| {
        hasher.write(&(bytes.len() as u64).to_le_bytes());
        hasher.write(bytes);
    };
    part(language.as_bytes());
    if let Some(source) = &request.source {
        part(b"source");
        part(source.as_bytes());
    }
    for file in request.files.iter().flatten() {
        part(file.name.as_bytes());
        part(format!("{:?}", file.encoding).as_bytes());
        part(file.content.as_bytes());
    }
    hasher.finish()
}

/// The ring's hash: FNV-1a over the bytes, finished with murmur3's `fmix64`. Plain FNV-1a (the
/// crate's default) moves only the low and middle bits for the last bytes written, while ring
/// positions are ordered by the high bits; the finalizer spreads every input bit over the word.
/// Fixed arithmetic, no seed: the same on every gateway and every build.
pub struct RingHasher(u64);

impl Default for RingHasher {
    fn default() -> RingHasher {
        RingHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for RingHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The crate chains vnode positions by hashing `u64`s: write them in a fixed byte order.
    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_le_bytes());
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type HashRing = Ring<NodeId, BuildHasherDefault<RingHasher>>;

/// What routing needs to know about one node that takes new work. `L` is the caller's handle to
/// the node's live load; routing only reads it through the `load` function it is given.
#[derive(Debug, Clone)]
pub struct NodeEntry<L> {
    pub id: NodeId,
    pub slots_total: u32,
    /// Languages with a runtime ready on the node, with each such runtime (its id, `""` from an
    /// agent that reports no runtimes, and the version it runs).
    pub languages: BTreeMap<String, Vec<(String, String)>>,
    pub load: L,
}

impl<L> NodeEntry<L> {
    /// The runtime of `language` this node runs for a request asking `version`, as the agent
    /// picks it: the newest of its ready runtimes whose version `version` names.
    pub fn runtime_for(&self, language: &str, version: Option<&str>) -> Option<&(String, String)> {
        runtime_among(self.languages.get(language)?, version)
    }
}

/// A node's runtimes of one language: (runtime id, version).
type Runtimes = Vec<(String, String)>;

/// The newest of `runtimes` (id, version) whose version `version` names.
fn runtime_among<'a>(
    runtimes: &'a [(String, String)],
    version: Option<&str>,
) -> Option<&'a (String, String)> {
    runtimes
        .iter()
        .filter(|(_, have)| version_matches(version, have))
        .max_by(|a, b| compare_versions(&a.1, &b.1))
}

/// What a job asks of its node.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// Canonical language name: the ring key.
    pub language: &'a str,
    /// A version prefix (`"3"`, `"3.11"`), matched on dot boundaries.
    pub version: Option<&'a str>,
    /// The runtime id the gateway resolved the request to: only a node that would run that
    /// runtime for `version` is a candidate. `None`: any runtime `version` names.
    pub runtime: Option<&'a str>,
    /// Nodes already tried for this job.
    pub exclude: &'a [NodeId],
    /// The program's affinity (see [`program_affinity`]): walk its order instead of the
    /// language's.
    pub affinity: Option<u64>,
}

#[derive(Debug)]
pub enum Decision<'a, L> {
    Node(&'a NodeEntry<L>),
    /// Some node could run it, but every one is at its slot count.
    Saturated,
    /// No node (left) has the language ready.
    Unavailable,
}

/// The ring and node table, built once per membership change and then only read.
pub struct RoutingTable<L> {
    vnodes: usize,
    ring: HashRing,
    /// Sorted by id.
    nodes: Vec<NodeEntry<L>>,
    index: HashMap<NodeId, usize>,
    /// Language → indexes into `nodes` of the nodes with it ready.
    /// Per language: the nodes that have it ready, each with its runtimes of it (copied here so
    /// that weighing every candidate costs no map lookup per node).
    by_language: HashMap<String, Vec<(usize, Runtimes)>>,
}

impl<L> RoutingTable<L> {
    /// A table with a fresh ring. Building costs O(k²) memory moves for k vnodes inside the
    /// crate, so membership changes go through [`RoutingTable::update`] instead.
    pub fn new(vnodes: usize, entries: Vec<NodeEntry<L>>) -> RoutingTable<L> {
        let ring = RingBuilder::new(BuildHasherDefault::default())
            .vnodes(vnodes)
            .build();
        RoutingTable::with_ring(vnodes, ring, entries)
    }

    /// A table for `entries` that reuses this ring: only the vnodes of nodes that joined or left
    /// are inserted or removed. The result equals `RoutingTable::new(vnodes, entries)`.
    pub fn update(&self, entries: Vec<NodeEntry<L>>) -> RoutingTable<L> {
        RoutingTable::with_ring(self.vnodes, self.ring.clone(), entries)
    }

    fn with_ring(vnodes: usize, mut ring: HashRing, mut entries: Vec<NodeEntry<L>>) -> Self {
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        entries.dedup_by(|a, b| a.id == b.id);
        let index: HashMap<NodeId, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.clone(), i))
            .collect();
        let gone: Vec<NodeId> = ring
            .resident_ranges()
            .map(|r| r.node().clone())
            .filter(|id| !index.contains_key(id))
            .collect();
        for id in &gone {
            ring.remove(id);
        }
        for entry in &entries {
            if ring.weight(&entry.id).is_none() {
                ring.insert(entry.id.clone());
            }
        }
        let mut by_language: HashMap<String, Vec<(usize, Runtimes)>> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            for (language, runtimes) in &entry.languages {
                by_language
                    .entry(language.clone())
                    .or_default()
                    .push((i, runtimes.clone()));
            }
        }
        RoutingTable {
            vnodes,
            ring,
            nodes: entries,
            index,
            by_language,
        }
    }

    pub fn nodes(&self) -> &[NodeEntry<L>] {
        &self.nodes
    }

    /// The node owning `key` on the ring, whatever its load or languages.
    pub fn primary(&self, key: &str) -> Option<&NodeId> {
        self.ring.try_get(Key::Language(key))
    }

    /// The node owning a program's affinity on the ring, whatever its load or languages.
    pub fn home(&self, affinity: u64) -> Option<&NodeId> {
        self.ring.try_get(Key::Program(affinity))
    }

    /// Fraction of the key space each node owns as a primary (sums to 1 over a non-empty ring).
    pub fn shares(&self) -> HashMap<NodeId, f64> {
        let mut shares: HashMap<NodeId, f64> = HashMap::new();
        for range in self.ring.resident_ranges() {
            let width = (range.keys().end() - range.keys().start()) as f64 + 1.0;
            *shares.entry(range.node().clone()).or_default() += width / 2f64.powi(64);
        }
        shares
    }

    /// Picks the node for `want`: the first in the key's preference order with the language
    /// ready, a free slot and a load (`load` of its handle) under the bound; when every node under
    /// the bound is at its slot count, the least loaded one with a free slot.
    pub fn choose(
        &self,
        want: &Want<'_>,
        balance_factor: f64,
        load: impl Fn(&L) -> u32,
    ) -> Decision<'_, L> {
        let Some(pool) = self.by_language.get(want.language) else {
            return Decision::Unavailable;
        };
        let eligible = |entry: &NodeEntry<L>, runtimes: &[(String, String)]| {
            !want.exclude.contains(&entry.id)
                && runtime_among(runtimes, want.version)
                    .is_some_and(|(id, _)| want.runtime.is_none_or(|r| r == id))
        };
        let (mut count, mut total) = (0u64, 0u64);
        for (entry, runtimes) in pool.iter().map(|(i, r)| (&self.nodes[*i], r)) {
            if eligible(entry, runtimes) {
                count += 1;
                total += u64::from(load(&entry.load));
            }
        }
        if count == 0 {
            return Decision::Unavailable;
        }
        let bound = (balance_factor * (total + 1) as f64 / count as f64).ceil() as u64;
        let mut fallback: Option<(u64, &NodeEntry<L>)> = None;
        let key = match want.affinity {
            Some(affinity) => Key::Program(affinity),
            None => Key::Language(want.language),
        };
        for id in self.ring.replicas(key) {
            let entry = &self.nodes[self.index[id]];
            let Some(runtimes) = entry.languages.get(want.language) else {
                continue;
            };
            if !eligible(entry, runtimes) {
                continue;
            }
            let load = u64::from(load(&entry.load));
            if load >= u64::from(entry.slots_total) {
                continue;
            }
            if load < bound {
                return Decision::Node(entry);
            }
            if fallback.is_none_or(|(least, _)| load < least) {
                fallback = Some((load, entry));
            }
        }
        fallback.map_or(Decision::Saturated, |(_, entry)| Decision::Node(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (splitmix64) for table and property tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const VNODES: usize = 160;
    const LANGUAGES: [&str; 6] = ["cpp", "go", "java", "javascript", "python", "rust"];

    /// A node with `languages` ready and `slots` slots; its load is its index into a slice.
    fn node_with(i: usize, slots: u32, languages: &[String]) -> NodeEntry<usize> {
        NodeEntry {
            id: NodeId::new(&format!("node-{i}")),
            slots_total: slots,
            languages: languages
                .iter()
                .map(|l| (l.clone(), vec![(String::new(), "1.0".to_string())]))
                .collect(),
            load: i,
        }
    }

    fn node(i: usize, slots: u32) -> NodeEntry<usize> {
        node_with(i, slots, &LANGUAGES.map(String::from))
    }

    fn table(n: usize) -> RoutingTable<usize> {
        RoutingTable::new(VNODES, (0..n).map(|i| node(i, u32::MAX)).collect())
    }

    fn keys() -> Vec<String> {
        (0..50_000).map(|i| format!("key-{i}")).collect()
    }

    fn owners(table: &RoutingTable<usize>, keys: &[String]) -> Vec<NodeId> {
        keys.iter()
            .map(|k| table.primary(k).unwrap().clone())
            .collect()
    }

    fn want(language: &str) -> Want<'_> {
        Want {
            language,
            version: None,
            runtime: None,
            exclude: &[],
            affinity: None,
        }
    }

    fn pick(table: &RoutingTable<usize>, want: &Want<'_>, loads: &[u32]) -> Option<usize> {
        match table.choose(want, 1.25, |&i| loads[i]) {
            Decision::Node(entry) => Some(entry.load),
            Decision::Saturated | Decision::Unavailable => None,
        }
    }

    #[test]
    fn bounded_load_keeps_max_within_c_of_average() {
        for (n, keyset) in [(3, 6), (10, 6), (100, 6), (10, 1), (100, 1_000)] {
            let keys: Vec<String> = (0..keyset).map(|i| format!("lang-{i}")).collect();
            let nodes = (0..n).map(|i| node_with(i, u32::MAX, &keys)).collect();
            let table = RoutingTable::new(VNODES, nodes);
            let mut loads = vec![0u32; n];
            let mut rng = Rng(n as u64);
            // 4n·t jobs make c·m/n = 5t whole, so the bound is exactly c times the average.
            let jobs = 4 * n * 25;
            for _ in 0..jobs {
                let key = &keys[rng.below(keys.len())];
                let i = pick(&table, &want(key), &loads).unwrap();
                loads[i] += 1;
            }
            let max = f64::from(*loads.iter().max().unwrap());
            let avg = jobs as f64 / n as f64;
            assert!(
                max / avg <= 1.25,
                "n={n} keys={keyset}: max/avg {}",
                max / avg
            );
        }
    }

    #[test]
    fn lone_stream_stays_on_its_primary() {
        let table = table(10);
        let mut loads = vec![0u32; 10];
        let primary = pick(&table, &want("python"), &loads).unwrap();
        assert_eq!(table.primary("python").unwrap(), &table.nodes()[primary].id);
        // One job in flight at a time: the primary is always under the bound.
        for _ in 0..100 {
            assert_eq!(pick(&table, &want("python"), &loads), Some(primary));
            loads[primary] = 0;
        }
        // Concurrent jobs spill once the primary reaches the bound, then come back.
        loads[primary] = 1;
        let spill = pick(&table, &want("python"), &loads).unwrap();
        assert_ne!(spill, primary);
    }

    #[test]
    fn candidates_need_language_slots_and_version() {
        let mut entries: Vec<NodeEntry<usize>> = (0..3).map(|i| node(i, 2)).collect();
        entries[0].languages.clear();
        entries[1]
            .languages
            .insert("python".into(), vec![(String::new(), "3.11.2".into())]);
        entries[2]
            .languages
            .insert("python".into(), vec![(String::new(), "3.12.0".into())]);
        let table = RoutingTable::new(VNODES, entries);
        let loads = [0, 0, 2];
        let cases: &[(Want<'_>, Option<usize>)] = &[
            (want("cobol"), None),
            (want("python"), Some(1)),
            (
                Want {
                    version: Some("3.12"),
                    ..want("python")
                },
                None, // node 2 has it, but both its slots are busy
            ),
            (
                Want {
                    version: Some("3.1"),
                    ..want("python")
                },
                None,
            ),
            (
                Want {
                    exclude: &[NodeId::new("node-1")],
                    ..want("python")
                },
                None,
            ),
        ];
        for (want, expected) in cases {
            assert_eq!(pick(&table, want, &loads), *expected, "{want:?}");
        }
        let saturated = Want {
            version: Some("3.12"),
            ..want("python")
        };
        assert!(matches!(
            table.choose(&saturated, 1.25, |&i| loads[i]),
            Decision::Saturated
        ));
        assert!(matches!(
            table.choose(&want("cobol"), 1.25, |&i| loads[i]),
            Decision::Unavailable
        ));
    }

    #[test]
    fn a_resolved_runtime_goes_only_to_nodes_that_would_run_it() {
        let mut entries: Vec<NodeEntry<usize>> = (0..2).map(|i| node(i, 2)).collect();
        let old = ("py/old".to_string(), "3.11.2".to_string());
        let new = ("py/new".to_string(), "3.13.5".to_string());
        entries[0]
            .languages
            .insert("python".into(), vec![old.clone(), new]);
        entries[1].languages.insert("python".into(), vec![old]);
        let table = RoutingTable::new(VNODES, entries);
        let cases: &[(Option<&str>, &str, Option<usize>)] = &[
            (None, "py/new", Some(0)),
            (Some("3.13"), "py/new", Some(0)),
            // Node 0 would run 3.13 for a request without a version, so only node 1 runs 3.11.
            (None, "py/old", Some(1)),
            (Some("3.1"), "py/old", None),
        ];
        for (version, runtime, expected) in cases {
            let want = Want {
                version: *version,
                runtime: Some(runtime),
                ..want("python")
            };
            assert_eq!(pick(&table, &want, &[0, 0]), *expected, "{want:?}");
        }
        // Asked for 3.11, both nodes run it: the one the ring prefers wins.
        let want = Want {
            version: Some("3.11"),
            runtime: Some("py/old"),
            ..want("python")
        };
        assert!(pick(&table, &want, &[0, 0]).is_some());
        let busy_first = [2, 0];
        assert_eq!(pick(&table, &want, &busy_first), Some(1));
    }

    fn by_program(affinity: u64) -> Want<'static> {
        Want {
            affinity: Some(affinity),
            ..want("cpp")
        }
    }

    #[test]
    fn a_program_goes_home_while_its_home_has_room() {
        let table = table(10);
        let mut loads = vec![0u32; 10];
        let mut homes = std::collections::BTreeSet::new();
        for affinity in 0..200u64 {
            let home = pick(&table, &by_program(affinity), &loads).unwrap();
            assert_eq!(table.home(affinity).unwrap(), &table.nodes()[home].id);
            assert_eq!(pick(&table, &by_program(affinity), &loads), Some(home));
            homes.insert(home);
        }
        assert_eq!(
            homes.len(),
            10,
            "programs of one language spread over its nodes"
        );
        // Its home at the bound: the program spills along its own order, the same each time,
        // and comes back once its home has room again.
        let home = pick(&table, &by_program(7), &loads).unwrap();
        loads[home] = 1;
        let spill = pick(&table, &by_program(7), &loads).unwrap();
        assert_ne!(spill, home);
        assert_eq!(pick(&table, &by_program(7), &loads), Some(spill));
        loads[home] = 0;
        assert_eq!(pick(&table, &by_program(7), &loads), Some(home));
        // A language's own key is not a program's: without affinity, its primary.
        let primary = pick(&table, &want("cpp"), &loads).unwrap();
        assert_eq!(table.primary("cpp").unwrap(), &table.nodes()[primary].id);
    }

    #[test]
    fn a_programs_walk_keeps_to_the_candidates_and_the_bound() {
        // Its home without the language: the next node of its order that has it.
        let mut entries: Vec<NodeEntry<usize>> = (0..5).map(|i| node(i, u32::MAX)).collect();
        let five = RoutingTable::new(VNODES, entries.clone());
        let home = pick(&five, &by_program(3), &[0; 5]).unwrap();
        entries[home].languages.remove("cpp");
        let without = RoutingTable::new(VNODES, entries);
        let moved = pick(&without, &by_program(3), &[0; 5]).unwrap();
        assert_ne!(moved, home);
        let excluded = [five.nodes()[home].id.clone()];
        let want = Want {
            exclude: &excluded,
            ..by_program(3)
        };
        assert_eq!(pick(&five, &want, &[0; 5]), Some(moved), "the same order");
        // Many jobs of few programs: the bound holds as for languages.
        let n = 10;
        let table = table(n);
        let mut loads = vec![0u32; n];
        let mut rng = Rng(11);
        let jobs = 4 * n * 25;
        for _ in 0..jobs {
            let affinity = rng.below(3) as u64;
            let i = pick(&table, &by_program(affinity), &loads).unwrap();
            loads[i] += 1;
        }
        let max = f64::from(*loads.iter().max().unwrap());
        assert!(max / (jobs as f64 / n as f64) <= 1.25, "loads {loads:?}");
    }

    #[test]
    fn program_affinity_is_the_files() {
        let request = |source: &str| codefleet_shared::ExecuteRequest {
            source: Some(source.to_string()),
            stdin: Some("ignored".into()),
            ..Default::default()
        };
        let a = program_affinity("cpp", &request("int main(){}"));
        let mut other_input = request("int main(){}");
        other_input.stdin = Some("other".into());
        other_input.args = Some(vec!["x".into()]);
        assert_eq!(program_affinity("cpp", &other_input), a);
        assert_ne!(program_affinity("cpp", &request("int main(){ }")), a);
        assert_ne!(program_affinity("c", &request("int main(){}")), a);
        let file = |name: &str, content: &str| codefleet_shared::FileSpec {
            name: name.into(),
            content: content.into(),
            encoding: Default::default(),
        };
        let files = |f: Vec<codefleet_shared::FileSpec>| codefleet_shared::ExecuteRequest {
            files: Some(f),
            ..Default::default()
        };
        assert_ne!(
            program_affinity("cpp", &files(vec![file("ab", "c")])),
            program_affinity("cpp", &files(vec![file("a", "bc")]))
        );
    }

    #[test]
    fn above_the_bound_a_free_slot_still_wins_over_waiting() {
        // Node 0 is small and full; node 1 is above the bound but has room.
        let table = RoutingTable::new(VNODES, vec![node(0, 2), node(1, 16)]);
        assert_eq!(pick(&table, &want("python"), &[2, 5]), Some(1));
    }

    #[test]
    fn adding_a_node_moves_about_its_share() {
        let keys = keys();
        for n in [3, 10, 50, 100] {
            let before = table(n);
            let after = before.update((0..=n).map(|i| node(i, u32::MAX)).collect());
            let new = NodeId::new(&format!("node-{n}"));
            let (old, now) = (owners(&before, &keys), owners(&after, &keys));
            let moved = old.iter().zip(&now).filter(|(a, b)| a != b).count();
            assert!(
                old.iter().zip(&now).all(|(a, b)| a == b || *b == new),
                "n={n}: a key moved between two old nodes"
            );
            let fraction = moved as f64 / keys.len() as f64;
            assert!(
                fraction <= 1.2 / (n + 1) as f64,
                "n={n}: moved {fraction}, bound {}",
                1.2 / (n + 1) as f64
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let keys = keys();
        for n in [3, 10, 100] {
            let before = table(n);
            let gone = NodeId::new("node-1");
            let after = before.update((0..n).filter(|&i| i != 1).map(|i| node(i, 8)).collect());
            for (old, now) in owners(&before, &keys).iter().zip(owners(&after, &keys)) {
                assert!(*old == gone || *old == now, "n={n}");
                assert_ne!(now, gone);
            }
        }
    }

    #[test]
    fn member_order_does_not_matter() {
        let keys = keys();
        let reference = owners(&table(20), &keys);
        let mut rng = Rng(7);
        for _ in 0..3 {
            let mut entries: Vec<NodeEntry<usize>> = (0..20).map(|i| node(i, 8)).collect();
            for i in (1..entries.len()).rev() {
                entries.swap(i, rng.below(i + 1));
            }
            assert_eq!(
                owners(&RoutingTable::new(VNODES, entries), &keys),
                reference
            );
        }
        // Growing one node at a time gives the same ring as building it at once.
        let mut grown = RoutingTable::new(VNODES, vec![]);
        for n in 1..=20 {
            grown = grown.update((0..n).rev().map(|i| node(i, 8)).collect());
        }
        assert_eq!(owners(&grown, &keys), reference);
    }

    #[test]
    fn shares_sum_to_one_and_are_even_enough() {
        for n in [3, 10, 100] {
            let shares = table(n).shares();
            assert_eq!(shares.len(), n);
            let sum: f64 = shares.values().sum();
            assert!((sum - 1.0).abs() < 1e-9);
            let max = shares.values().cloned().fold(0.0, f64::max);
            assert!(max * n as f64 <= 1.5, "n={n}: max share {max}");
        }
    }
}
