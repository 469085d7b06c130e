//! Which part of an image to copy next, and from which node. A
//! single-platform image is copied whole by one agent. An index is copied
//! in parts, one assignment at a time: each from the free agent whose node
//! holds the most children still missing, the last with the index itself,
//! so several nodes contribute to one backup and the one writer of status
//! records each part as it lands. One part at a time keeps one agent per
//! job; parts in parallel would gain little, since the backup registry's
//! ingest, not the nodes, limits a copy.

use std::collections::HashSet;

use super::{Finish, Status};

/// A child manifest of an index, as the inventories list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    pub platform: String,
    pub digest: String,
    pub attestation: bool,
}

/// A connected agent whose node holds the image or part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub agent_id: String,
    pub node: String,
    /// It has a free slot.
    pub free: bool,
    /// It holds the image's root (the index, or the whole manifest).
    pub root: bool,
    /// For an index: the children its node holds whole.
    pub children: Vec<String>,
    /// The platform of its node (`linux/amd64`), as the agent registered.
    pub platform: String,
}

/// What the connected agents hold of one image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// For an index: its children, from a holder's inventory. Empty for a
    /// single-platform image and for an index no connected node holds.
    pub children: Vec<Child>,
    /// Least busy first.
    pub agents: Vec<Holding>,
}

/// One assignment's share of the copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Part {
    /// Children to copy from the agent's node.
    pub manifests: Vec<String>,
    pub finish: Finish,
    /// For a reduced index: the children already in the backup registry.
    pub keep: Vec<String>,
    /// Children no node holds, copied from the source registry.
    pub from_source: Vec<String>,
}

/// The next part, or why there is none now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Assign {
        agent_id: String,
        node: String,
        part: Part,
    },
    /// Holders exist but none can take it now.
    Wait(String),
    /// No connected node holds the image.
    Absent(String),
    /// The children left are on no connected node. `finisher` is a free
    /// agent that holds the index: it can copy them from the source and
    /// push the index, or push a reduced index of what is copied.
    Nowhere {
        left: Vec<String>,
        platforms: Vec<String>,
        finisher: Option<(String, String)>,
        /// Those of `platforms` that a node holding the index runs on: it
        /// runs the image but lacks parts of its own platform (containerd
        /// discards or skips layers). Never left out of a backup.
        in_use: Vec<String>,
    },
}

/// The children of an index already in the backup registry.
pub fn copied(status: &Status) -> HashSet<&str> {
    status.platforms.iter().filter(|p| p.copied_from.is_some()).map(|p| p.digest.as_str()).collect()
}

pub fn next(status: &Status, holdings: &Holdings, digest: &str) -> Plan {
    if holdings.children.is_empty() {
        return whole(holdings, digest);
    }
    let copied = copied(status);
    let left: Vec<&Child> = holdings.children.iter().filter(|c| !copied.contains(c.digest.as_str())).collect();
    let holds_left = |h: &Holding| -> Vec<String> {
        left.iter().filter(|c| h.children.contains(&c.digest)).map(|c| c.digest.clone()).collect()
    };
    if left.is_empty() {
        return match holdings.agents.iter().find(|h| h.root && h.free) {
            Some(h) => assign(h, Part { finish: Finish::Index, ..Part::default() }),
            None => busy_or_absent(holdings, digest),
        };
    }
    // The free agent that copies the most of what is left.
    let best = holdings
        .agents
        .iter()
        .filter(|h| h.free)
        .map(|h| (holds_left(h), h))
        .filter(|(held, _)| !held.is_empty())
        // The first of equals: the least busy.
        .min_by_key(|(held, _)| std::cmp::Reverse(held.len()));
    if let Some((manifests, holder)) = best {
        let finish = if manifests.len() == left.len() && holder.root { Finish::Index } else { Finish::None };
        return assign(holder, Part { manifests, finish, ..Part::default() });
    }
    if holdings.agents.iter().any(|h| !holds_left(h).is_empty()) {
        let busy = holdings.agents.iter().filter(|h| !holds_left(h).is_empty()).count();
        return Plan::Wait(format!(
            "waiting for a free agent: the {busy} agent(s) on nodes that hold platforms of {digest} are busy"
        ));
    }
    if holdings.agents.iter().all(|h| !h.root) {
        return busy_or_absent(holdings, digest);
    }
    let in_use = left
        .iter()
        .filter(|c| !c.attestation && holdings.agents.iter().any(|h| h.root && h.platform == c.platform))
        .map(|c| c.platform.clone())
        .collect();
    Plan::Nowhere {
        left: left.iter().map(|c| c.digest.clone()).collect(),
        platforms: left.iter().map(|c| platform_label(c)).collect(),
        finisher: holdings.agents.iter().find(|h| h.root && h.free).map(|h| (h.agent_id.clone(), h.node.clone())),
        in_use,
    }
}

/// A platform as status and messages show it.
pub fn platform_label(child: &Child) -> String {
    if child.attestation { format!("{} (attestation)", child.platform) } else { child.platform.clone() }
}

fn whole(holdings: &Holdings, digest: &str) -> Plan {
    match holdings.agents.iter().find(|h| h.root && h.free) {
        Some(h) => assign(h, Part::default()),
        None => busy_or_absent(holdings, digest),
    }
}

fn busy_or_absent(holdings: &Holdings, digest: &str) -> Plan {
    let busy = holdings.agents.iter().filter(|h| h.root).count();
    if busy > 0 {
        Plan::Wait(format!("waiting for a free agent: the {busy} agent(s) on nodes that hold {digest} are busy"))
    } else {
        Plan::Absent(format!("no connected agent runs on a node that holds {digest}"))
    }
}

fn assign(holder: &Holding, part: Part) -> Plan {
    Plan::Assign { agent_id: holder.agent_id.clone(), node: holder.node.clone(), part }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::PlatformCopy;

    fn child(platform: &str, digest: &str) -> Child {
        Child { platform: platform.into(), digest: digest.into(), attestation: platform == "unknown/unknown" }
    }

    fn holding(agent: &str, free: bool, root: bool, children: &[&str]) -> Holding {
        Holding {
            agent_id: agent.into(),
            node: format!("node-{agent}"),
            free,
            root,
            children: children.iter().map(|c| c.to_string()).collect(),
            platform: "linux/amd64".into(),
        }
    }

    fn index(agents: Vec<Holding>) -> Holdings {
        Holdings {
            children: vec![child("linux/amd64", "a"), child("linux/arm64", "b"), child("unknown/unknown", "att")],
            agents,
        }
    }

    fn with_copied(digests: &[&str]) -> Status {
        Status {
            platforms: digests
                .iter()
                .map(|d| PlatformCopy {
                    digest: d.to_string(),
                    copied_from: Some("node/x".into()),
                    ..PlatformCopy::default()
                })
                .collect(),
            ..Status::default()
        }
    }

    #[test]
    fn a_single_platform_image_goes_whole_to_a_free_holder() {
        let holdings =
            Holdings { children: vec![], agents: vec![holding("a", false, true, &[]), holding("b", true, true, &[])] };
        let Plan::Assign { agent_id, part, .. } = next(&Status::default(), &holdings, "d") else { panic!() };
        assert_eq!((agent_id.as_str(), part), ("b", Part::default()));
        let busy = Holdings { children: vec![], agents: vec![holding("a", false, true, &[])] };
        assert!(matches!(next(&Status::default(), &busy, "d"), Plan::Wait(m) if m.contains("busy")));
    }

    #[test]
    fn each_node_copies_what_it_holds_and_the_last_part_finishes_the_index() {
        let holdings = index(vec![holding("x", true, true, &["a"]), holding("y", true, true, &["b"])]);
        let Plan::Assign { agent_id, part, .. } = next(&Status::default(), &holdings, "d") else { panic!() };
        assert_eq!(agent_id, "x");
        assert_eq!((part.manifests, part.finish), (vec!["a".to_string()], Finish::None));
        // The attestation is on no node: after both platforms, a reduced
        // index is what is left to decide.
        let Plan::Assign { agent_id, part, .. } = next(&with_copied(&["a"]), &holdings, "d") else { panic!() };
        assert_eq!((agent_id.as_str(), part.manifests, part.finish), ("y", vec!["b".to_string()], Finish::None));
        let Plan::Nowhere { left, platforms, finisher, in_use } = next(&with_copied(&["a", "b"]), &holdings, "d")
        else {
            panic!()
        };
        assert!(in_use.is_empty(), "attestations are never in use");
        assert_eq!((left, platforms), (vec!["att".to_string()], vec!["unknown/unknown (attestation)".to_string()]));
        assert_eq!(finisher, Some(("x".into(), "node-x".into())));
    }

    #[test]
    fn a_holder_of_everything_left_finishes_in_the_same_assignment() {
        let holdings = index(vec![holding("x", true, true, &["a", "b", "att"])]);
        let Plan::Assign { part, .. } = next(&with_copied(&["a"]), &holdings, "d") else { panic!() };
        assert_eq!((part.manifests.len(), part.finish), (2, Finish::Index));
        let Plan::Assign { part, .. } = next(&with_copied(&["a", "b", "att"]), &holdings, "d") else { panic!() };
        assert_eq!((part.manifests.len(), part.finish), (0, Finish::Index));
    }

    #[test]
    fn busy_holders_are_waited_for_before_anything_counts_as_nowhere() {
        let holdings = index(vec![holding("x", true, true, &["a"]), holding("y", false, true, &["b"])]);
        assert!(matches!(next(&with_copied(&["a"]), &holdings, "d"), Plan::Wait(m) if m.contains("busy")));
        // A node holds the index but no platform whole (containerd skipped
        // layers it had as snapshots): everything may come from the source.
        let nothing_whole = index(vec![holding("x", true, true, &[])]);
        let Plan::Nowhere { left, in_use, .. } = next(&Status::default(), &nothing_whole, "d") else { panic!() };
        assert_eq!(left.len(), 3);
        assert_eq!(in_use, ["linux/amd64"], "the node runs its own platform, incomplete");
    }
}
