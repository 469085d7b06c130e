//! Deletions a watch relist implies. When a watch falls too far behind the
//! API server (410 Gone, or a broken connection after a long while), kube's
//! watcher lists again and sends only the objects that exist then: one
//! deleted in between never arrives as a `Delete`, and the in-memory
//! indexes keyed by it (who uses an image, live jobs, WatchJobs clients)
//! would keep it for ever. The reflector store replaces itself on a relist;
//! this does the same for the keys everything else holds.

use std::{collections::HashSet, hash::Hash};

use kube::runtime::watcher::Event;

/// What one watch event means for the objects seen so far.
#[derive(Debug, PartialEq)]
pub enum Change<'a, K, Key> {
    /// First seen (or seen again after it had gone).
    Added(&'a K),
    Modified(&'a K),
    /// Deleted: from a `Delete` event, with the object's last state, or
    /// missing from a relist, with only its key.
    Deleted(Key, Option<&'a K>),
}

/// The keys of every object a watch has shown and not deleted.
pub struct Seen<F, Key> {
    key: F,
    current: HashSet<Key>,
    /// The keys a relist in progress has brought back so far.
    relisted: Option<HashSet<Key>>,
}

// === impl Seen ===

impl<F, Key: Clone + Eq + Hash> Seen<F, Key> {
    pub fn new(key: F) -> Self {
        Self { key, current: HashSet::new(), relisted: None }
    }

    pub fn observe<'a, K>(&mut self, event: &'a Event<K>) -> Vec<Change<'a, K, Key>>
    where
        F: Fn(&K) -> Key,
    {
        match event {
            Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            Event::InitApply(object) | Event::Apply(object) => {
                let key = (self.key)(object);
                if let (Event::InitApply(_), Some(relisted)) = (event, self.relisted.as_mut()) {
                    relisted.insert(key.clone());
                }
                if self.current.insert(key) { vec![Change::Added(object)] } else { vec![Change::Modified(object)] }
            }
            Event::Delete(object) => {
                let key = (self.key)(object);
                self.current.remove(&key);
                vec![Change::Deleted(key, Some(object))]
            }
            Event::InitDone => {
                let Some(relisted) = self.relisted.take() else { return Vec::new() };
                let gone: Vec<Key> = self.current.difference(&relisted).cloned().collect();
                self.current = relisted;
                gone.into_iter().map(|key| Change::Deleted(key, None)).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Seen<impl Fn(&&'static str) -> String, String> {
        Seen::new(|name: &&str| name.to_string())
    }

    #[test]
    fn a_relist_deletes_what_it_does_not_bring_back() {
        let mut seen = seen();
        let (web, api, db) = ("web", "api", "db");
        assert_eq!(seen.observe(&Event::Init), []);
        assert_eq!(seen.observe(&Event::InitApply(web)), [Change::Added(&web)]);
        assert_eq!(seen.observe(&Event::InitApply(api)), [Change::Added(&api)]);
        assert_eq!(seen.observe(&Event::InitDone), [], "the first list deletes nothing");
        assert_eq!(seen.observe(&Event::Apply(api)), [Change::Modified(&api)]);

        // The watch fell behind: `api` was deleted and `db` created meanwhile.
        seen.observe(&Event::Init);
        assert_eq!(seen.observe(&Event::InitApply(web)), [Change::Modified(&web)]);
        assert_eq!(seen.observe(&Event::InitApply(db)), [Change::Added(&db)]);
        assert_eq!(seen.observe(&Event::InitDone), [Change::Deleted("api".to_string(), None)]);

        assert_eq!(seen.observe(&Event::Delete(db)), [Change::Deleted("db".to_string(), Some(&db))]);
        seen.observe(&Event::Init);
        assert_eq!(seen.observe(&Event::InitDone), [Change::Deleted("web".to_string(), None)]);
    }
}
