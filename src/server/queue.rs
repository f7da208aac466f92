//! The scheduler's queue of waiting tasks.
//!
//! Tasks with the same needs (plugin, target, capability) wait in one
//! *lane*, ordered by their aging key. A dispatch pass looks at the head of
//! each lane only: a lane that no device can serve right now (its target is
//! offline, nobody online has its capability, its devices are full) is
//! skipped whole, however many tasks it holds, so one device's backlog
//! never delays another device's work. Among the lanes that can be served
//! the pass still takes the best key first, so priority and aging hold
//! across lanes.
//!
//! Tasks that may not be dispatched yet are *held* outside the lanes: a
//! retry in back-off until its time, a task recovered after a restart until
//! its previous device is back (or has had its time to come back). They
//! join their lane when that happens, so held tasks are never walked either.
//!
//! An optional expiry per task (`scheduler.queue_ttl_ms`) is indexed by
//! time, so finding the expired ones does not scan the queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio::time::Instant;

/// Order in the queue: higher score first, then first come first served.
/// The score is `priority × aging_ms − created_ms`, computed in `i128` so
/// that no `aging_ms` can overflow it and invert the order.
pub type Key = (Reverse<i128>, u64);

/// The aging key of a task (see the scheduler's module doc).
pub fn score(priority: u8, aging_ms: u64, created_ms: u64) -> i128 {
    priority as i128 * aging_ms as i128 - created_ms as i128
}

/// What a task needs from a device. Tasks with equal needs share a lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Needs {
    pub plugin: String,
    pub target: Option<String>,
    pub capability: Option<String>,
    /// A device class the route asks for (`class:edge`, `class:heavy`).
    pub class: Option<&'static str>,
}

/// A lane's handle, valid while the lane has tasks.
pub type LaneId = u64;

struct Lane {
    needs: Needs,
    ready: BTreeMap<Key, String>,
    /// Tasks of this lane, ready or held: the lane goes when it is empty.
    members: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Place {
    Ready,
    /// Until `until`, or until `device` comes back online if one is named.
    Held {
        until: Instant,
        device: Option<String>,
    },
}

struct Entry {
    lane: LaneId,
    key: Key,
    place: Place,
    expires: Option<Instant>,
}

/// The queue: every task waiting for a dispatch, ready or held.
#[derive(Default)]
pub struct Queue {
    entries: HashMap<String, Entry>,
    lanes: HashMap<LaneId, Lane>,
    lane_of: HashMap<Needs, LaneId>,
    next_lane: LaneId,
    held: BTreeMap<(Instant, u64), String>,
    held_for: HashMap<String, HashSet<String>>,
    expiry: BTreeMap<(Instant, u64), String>,
    /// Lanes by the device they name: a pass looks up the lanes of the
    /// devices that have room, never the lanes of the others.
    by_target: HashMap<String, HashSet<LaneId>>,
    /// Lanes that name no device (few: one per plugin and capability some
    /// known device offers, as submissions are refused otherwise).
    untargeted: HashSet<LaneId>,
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    /// Tasks waiting, ready or held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// Queues `id`, replacing any entry it already has (a task is in the
    /// queue at most once). `hold`: not before this time, or (with a
    /// device) until that device is back, whichever comes first.
    pub fn insert(
        &mut self,
        id: String,
        needs: Needs,
        key: Key,
        hold: Option<(Instant, Option<String>)>,
        expires: Option<Instant>,
    ) {
        self.remove(&id);
        let lane = match self.lane_of.get(&needs) {
            Some(l) => *l,
            None => {
                self.next_lane += 1;
                let l = self.next_lane;
                self.lane_of.insert(needs.clone(), l);
                match &needs.target {
                    Some(t) => {
                        self.by_target.entry(t.clone()).or_default().insert(l);
                    }
                    None => {
                        self.untargeted.insert(l);
                    }
                }
                self.lanes.insert(
                    l,
                    Lane {
                        needs,
                        ready: BTreeMap::new(),
                        members: 0,
                    },
                );
                l
            }
        };
        let lane_ref = self.lanes.get_mut(&lane).expect("lane just found");
        lane_ref.members += 1;
        let place = match hold {
            None => {
                lane_ref.ready.insert(key, id.clone());
                Place::Ready
            }
            Some((until, device)) => {
                self.held.insert((until, key.1), id.clone());
                if let Some(d) = &device {
                    self.held_for
                        .entry(d.clone())
                        .or_default()
                        .insert(id.clone());
                }
                Place::Held { until, device }
            }
        };
        if let Some(at) = expires {
            self.expiry.insert((at, key.1), id.clone());
        }
        self.entries.insert(
            id,
            Entry {
                lane,
                key,
                place,
                expires,
            },
        );
    }

    /// Takes `id` out of the queue; false if it was not there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(e) = self.entries.remove(id) else {
            return false;
        };
        self.unplace(id, &e);
        if let Some(at) = e.expires {
            self.expiry.remove(&(at, e.key.1));
        }
        let lane = self.lanes.get_mut(&e.lane).expect("an entry's lane exists");
        lane.members -= 1;
        if lane.members == 0 {
            let lane = self.lanes.remove(&e.lane).expect("present");
            self.lane_of.remove(&lane.needs);
            match &lane.needs.target {
                Some(t) => {
                    if let Some(set) = self.by_target.get_mut(t) {
                        set.remove(&e.lane);
                        if set.is_empty() {
                            self.by_target.remove(t);
                        }
                    }
                }
                None => {
                    self.untargeted.remove(&e.lane);
                }
            }
        }
        true
    }

    /// Removes an entry from its lane or from the held set (not from the map).
    fn unplace(&mut self, id: &str, e: &Entry) {
        match &e.place {
            Place::Ready => {
                if let Some(l) = self.lanes.get_mut(&e.lane) {
                    l.ready.remove(&e.key);
                }
            }
            Place::Held { until, device } => {
                self.held.remove(&(*until, e.key.1));
                if let Some(d) = device {
                    if let Some(set) = self.held_for.get_mut(d) {
                        set.remove(id);
                        if set.is_empty() {
                            self.held_for.remove(d);
                        }
                    }
                }
            }
        }
    }

    fn make_ready(&mut self, id: &str) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if e.place == Place::Ready {
            return;
        }
        let (lane, key) = (e.lane, e.key);
        let e = self.entries.remove(id).expect("present");
        self.unplace(id, &e);
        self.entries.insert(
            id.to_string(),
            Entry {
                place: Place::Ready,
                ..e
            },
        );
        if let Some(l) = self.lanes.get_mut(&lane) {
            l.ready.insert(key, id.to_string());
        }
    }

    /// Moves a ready task back to the held set.
    pub fn hold(&mut self, id: &str, until: Instant, device: Option<String>) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        let (lane, key, expires) = (e.lane, e.key, e.expires);
        let needs = self.lanes[&lane].needs.clone();
        self.insert(id.to_string(), needs, key, Some((until, device)), expires);
    }

    /// Held tasks whose time has come join their lanes.
    pub fn release_due(&mut self, now: Instant) {
        while let Some(((at, _), id)) = self.held.first_key_value() {
            if *at > now {
                break;
            }
            let id = id.clone();
            self.make_ready(&id);
        }
    }

    /// Tasks held for `device` join their lanes: it is back.
    pub fn device_back(&mut self, device: &str) {
        let ids: Vec<String> = self
            .held_for
            .get(device)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.make_ready(&id);
        }
    }

    /// Tasks whose queue time ran out by `now`, taken out of the queue.
    pub fn take_expired(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(((at, _), id)) = self.expiry.first_key_value() {
            if *at > now {
                break;
            }
            let id = id.clone();
            self.remove(&id);
            out.push(id);
        }
        out
    }

    /// Every lane with a ready task: its id, needs and head key.
    pub fn lanes(&self) -> impl Iterator<Item = (LaneId, &Needs, Key)> {
        self.lanes.iter().filter_map(|(id, l)| {
            let (k, _) = l.ready.first_key_value()?;
            Some((*id, &l.needs, *k))
        })
    }

    /// The lanes with a ready task that name `device` as their target.
    pub fn lanes_for_target<'a>(
        &'a self,
        device: &str,
    ) -> impl Iterator<Item = (LaneId, &'a Needs, Key)> + 'a {
        self.by_target
            .get(device)
            .into_iter()
            .flatten()
            .filter_map(|id| self.ready_head(*id))
    }

    /// The lanes with a ready task that name no target.
    pub fn untargeted_lanes(&self) -> impl Iterator<Item = (LaneId, &Needs, Key)> {
        self.untargeted.iter().filter_map(|id| self.ready_head(*id))
    }

    fn ready_head(&self, id: LaneId) -> Option<(LaneId, &Needs, Key)> {
        let l = self.lanes.get(&id)?;
        let (k, _) = l.ready.first_key_value()?;
        Some((id, &l.needs, *k))
    }

    /// The best ready task of a lane.
    pub fn head(&self, lane: LaneId) -> Option<(Key, &str)> {
        let (k, id) = self.lanes.get(&lane)?.ready.first_key_value()?;
        Some((*k, id.as_str()))
    }

    /// The first ready task in key order over all lanes (tests, diagnostics).
    pub fn first_ready(&self) -> Option<&str> {
        self.lanes
            .values()
            .filter_map(|l| l.ready.first_key_value())
            .min_by_key(|(k, _)| **k)
            .map(|(_, id)| id.as_str())
    }

    /// Lanes (distinct needs) currently known.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn needs(plugin: &str, target: Option<&str>) -> Needs {
        Needs {
            plugin: plugin.into(),
            target: target.map(String::from),
            capability: None,
            class: None,
        }
    }

    fn key(score: i128, seq: u64) -> Key {
        (Reverse(score), seq)
    }

    #[test]
    fn one_entry_per_task_and_lanes_come_and_go() {
        let now = Instant::now();
        let mut q = Queue::new();
        q.insert("a".into(), needs("echo", None), key(5, 1), None, None);
        // Re-queueing replaces, never duplicates.
        q.insert("a".into(), needs("echo", None), key(5, 2), None, None);
        assert_eq!(q.len(), 1);
        assert_eq!(q.lane_count(), 1);
        q.insert("b".into(), needs("echo", Some("x")), key(9, 3), None, None);
        assert_eq!(q.lane_count(), 2);
        assert_eq!(q.first_ready(), Some("b"));
        assert!(q.remove("b"));
        assert!(!q.remove("b"));
        assert_eq!(q.lane_count(), 1);
        // Held: not in a lane until released.
        let later = now + Duration::from_secs(1);
        q.insert(
            "c".into(),
            needs("echo", None),
            key(100, 4),
            Some((later, None)),
            None,
        );
        assert_eq!(q.first_ready(), Some("a"));
        q.release_due(now);
        assert_eq!(q.first_ready(), Some("a"));
        q.release_due(later);
        assert_eq!(q.first_ready(), Some("c"));
        // Held for a device: released when it is back.
        q.insert(
            "d".into(),
            needs("echo", None),
            key(200, 5),
            Some((later + Duration::from_secs(60), Some("pi".into()))),
            None,
        );
        assert_eq!(q.first_ready(), Some("c"));
        q.device_back("pi");
        assert_eq!(q.first_ready(), Some("d"));
        q.hold("d", later, Some("pi".into()));
        assert_eq!(q.first_ready(), Some("c"));
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn expiry_is_indexed_by_time() {
        let now = Instant::now();
        let mut q = Queue::new();
        for i in 0..10u64 {
            let at = now + Duration::from_millis(i * 10);
            q.insert(
                format!("t{i}"),
                needs("echo", None),
                key(0, i),
                None,
                Some(at),
            );
        }
        let gone = q.take_expired(now + Duration::from_millis(35));
        assert_eq!(gone, vec!["t0", "t1", "t2", "t3"]);
        assert_eq!(q.len(), 6);
        q.remove("t5");
        assert_eq!(q.take_expired(now + Duration::from_secs(1)).len(), 5);
        assert!(q.is_empty());
        assert_eq!(q.lane_count(), 0);
    }
}
