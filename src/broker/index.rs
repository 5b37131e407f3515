//! Which sessions want which topics: a tree of filter levels.
//!
//! Matching a topic walks the tree once, level by level (literal child, `+` child, and the
//! `#` subscribers of every node on the way), so its cost follows the topic's depth and the
//! number of matching subscriptions, not the number of subscriptions in total. A session has
//! at most one subscription per filter [MQTT-3.8.4-3]; subscribing again replaces its
//! options. Shared subscriptions live beside plain ones, one group per share name and filter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::mailbox::Mailbox;
use super::small::SmallMap;

/// A subscription's options (MQTT 5 §3.8.3.1; 3.1.1 has only the QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The maximum QoS granted.
    pub qos: u8,
    /// Do not send the session's own publishes back to it.
    pub no_local: bool,
    /// Keep the RETAIN flag of live messages.
    pub retain_as_published: bool,
    /// The Subscription Identifier, sent back with every match.
    pub id: Option<u32>,
}

#[derive(Debug, Clone)]
struct Subscriber {
    options: Options,
    mailbox: Arc<Mailbox>,
}

/// Subscribers of one filter end: plain ones by client id, shared ones by group.
#[derive(Debug, Default)]
struct Subs {
    plain: SmallMap<Arc<str>, Subscriber>,
    groups: SmallMap<Box<str>, Group>,
}

impl Subs {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

/// A shared subscription's members; each message goes to one of them, in turn.
#[derive(Debug, Default)]
struct Group {
    members: Vec<(Arc<str>, Subscriber)>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
///
/// Boxed children and subscriber sets: 10,000 devices each subscribed to its own command
/// topic make 20,000 nodes, most of them with one child and no subscriber, and a node held
/// inline in its parent's map (with two empty sets of two maps each) cost 1.6 KiB a device.
/// Small maps: a one-entry `HashMap` per node and per set made the index 600 bytes a device.
struct Node {
    children: SmallMap<Box<str>, Box<Node>>,
    plus: Option<Box<Node>>,
    /// Filters that end here.
    here: Option<Box<Subs>>,
    /// Filters that end with `#` right below here.
    hash: Option<Box<Subs>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_none()
            && self.hash.is_none()
    }
}

/// One delivery a publish yields: a session, and what its matching subscriptions make of it.
/// Borrowed from the index: a publish pushes to its targets under the index's read lock
/// rather than clone two `Arc`s per target (most of a full subscriber's cost per message).
#[derive(Debug)]
pub struct Target<'a> {
    pub client: &'a Arc<str>,
    pub mailbox: &'a Mailbox,
    pub qos: u8,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<u32>,
}

/// Every subscription of every session.
#[derive(Debug, Default)]
pub struct Index {
    root: Node,
    count: usize,
    /// The most targets one publish has found (up to [`TARGETS_ROOM_MAX`]): the room the
    /// next publish's list starts with, so a fan-out to ten sessions does not grow its list
    /// from 8 to 16 on every message (a `realloc` each, often past glibc's per-thread cache).
    targets_room: AtomicUsize,
}

/// A publish's list of targets starts with room for at least this many...
const TARGETS_ROOM_MIN: usize = 8;
/// ...and at most this many (48 bytes each: within glibc's per-thread cache), so one
/// publish to thousands of sessions does not make every later one allocate for thousands.
const TARGETS_ROOM_MAX: usize = 21;

impl Index {
    /// Adds or replaces `client`'s subscription to `filter` (a checked filter without its
    /// share prefix) in `share`'s group, if any. Returns whether it already existed.
    pub fn insert(
        &mut self,
        share: Option<&str>,
        filter: &str,
        client: &Arc<str>,
        options: Options,
        mailbox: &Arc<Mailbox>,
    ) -> bool {
        let subs = end(&mut self.root, filter);
        let subscriber = Subscriber {
            options,
            mailbox: Arc::clone(mailbox),
        };
        let existed = match share {
            None => subs.plain.insert(Arc::clone(client), subscriber).is_some(),
            Some(group) => {
                let group = subs.groups.get_or_insert_with(group, Group::default);
                match group.members.iter_mut().find(|(c, _)| c == client) {
                    Some(member) => {
                        member.1 = subscriber;
                        true
                    }
                    None => {
                        group.members.push((Arc::clone(client), subscriber));
                        false
                    }
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes `client`'s subscription; returns whether there was one.
    pub fn remove(&mut self, share: Option<&str>, filter: &str, client: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove(&mut self.root, &levels, share, client);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Subscriptions in the index.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sessions `topic` goes to, one [`Target`] per session. `publisher` is the client
    /// that published it (for No Local).
    pub fn targets<'a>(&'a self, topic: &str, publisher: Option<&str>) -> Vec<Target<'a>> {
        let room = self.targets_room.load(Ordering::Relaxed);
        let mut found = Found {
            publisher,
            targets: Vec::new(),
            room,
        };
        // [MQTT-4.7.2-1] no leading wildcard matches a `$` topic.
        let dollar = topic.starts_with('$');
        walk(&self.root, Some(topic), 0, dollar, &mut found);
        let n = found.targets.len();
        if n > room && room < TARGETS_ROOM_MAX {
            // Written only when it grows: every publisher reads it, under the read lock.
            self.targets_room
                .store(n.min(TARGETS_ROOM_MAX), Ordering::Relaxed);
        }
        found.targets
    }
}

/// The [`Subs`] a filter ends at, creating the path.
fn end<'a>(root: &'a mut Node, filter: &str) -> &'a mut Subs {
    let mut node = root;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level == "#" {
            return node.hash.get_or_insert_with(Box::default);
        }
        node = if level == "+" {
            node.plus.get_or_insert_with(Box::default)
        } else {
            node.children.get_or_insert_with(level, Box::default)
        };
        if levels.peek().is_none() {
            break;
        }
    }
    node.here.get_or_insert_with(Box::default)
}

fn remove(node: &mut Node, levels: &[&str], share: Option<&str>, client: &str) -> bool {
    let Some((&level, rest)) = levels.split_first() else {
        return remove_sub(&mut node.here, share, client);
    };
    if level == "#" {
        return remove_sub(&mut node.hash, share, client);
    }
    if level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        let removed = remove(child, rest, share, client);
        if child.is_empty() {
            node.plus = None;
        }
        removed
    } else {
        let Some(child) = node.children.get_mut(level) else {
            return false;
        };
        let removed = remove(child, rest, share, client);
        if child.is_empty() {
            node.children.remove(level);
        }
        removed
    }
}

/// Removes from a node's set, dropping the set once it is empty.
fn remove_sub(slot: &mut Option<Box<Subs>>, share: Option<&str>, client: &str) -> bool {
    let Some(subs) = slot.as_deref_mut() else {
        return false;
    };
    let removed = remove_from(subs, share, client);
    if subs.is_empty() {
        *slot = None;
    }
    removed
}

fn remove_from(subs: &mut Subs, share: Option<&str>, client: &str) -> bool {
    match share {
        None => subs.plain.remove(client).is_some(),
        Some(name) => {
            let Some(group) = subs.groups.get_mut(name) else {
                return false;
            };
            let before = group.members.len();
            group.members.retain(|(c, _)| &**c != client);
            let removed = group.members.len() != before;
            if group.members.is_empty() {
                subs.groups.remove(name);
            }
            removed
        }
    }
}

struct Found<'a, 'p> {
    publisher: Option<&'p str>,
    targets: Vec<Target<'a>>,
    /// Room to make at the first target (none is made for a topic nobody wants).
    room: usize,
}

impl<'a> Found<'a, '_> {
    fn add(&mut self, client: &'a Arc<str>, sub: &'a Subscriber) {
        if sub.options.no_local && self.publisher == Some(&**client) {
            return;
        }
        // One delivery per session: the highest QoS of its matching subscriptions, and
        // every identifier [MQTT-3.3.4-3], [MQTT-3.3.4-5]. Few targets match one topic, so a
        // linear search beats hashing here. A session is known by its mailbox: all its
        // subscriptions share it, and a session replaced leaves the index before its
        // successor subscribes (`Broker::attach`), so a pointer compare says what comparing
        // client ids said, without their bytes (a `memcmp` per pair of same-length ids).
        let mailbox: &Mailbox = &sub.mailbox;
        if let Some(t) = self
            .targets
            .iter_mut()
            .find(|t| std::ptr::eq(t.mailbox, mailbox))
        {
            debug_assert_eq!(t.client, client, "two sessions share a mailbox");
            t.qos = t.qos.max(sub.options.qos);
            t.retain_as_published |= sub.options.retain_as_published;
            t.subscription_ids.extend(sub.options.id);
            return;
        }
        if self.targets.capacity() == 0 {
            // Growing from 4 to 8 and on was an allocation per step of every publish.
            self.targets.reserve_exact(self.room.max(TARGETS_ROOM_MIN));
        }
        self.targets.push(Target {
            client,
            mailbox: &sub.mailbox,
            qos: sub.options.qos,
            retain_as_published: sub.options.retain_as_published,
            subscription_ids: sub.options.id.into_iter().collect(),
        });
    }

    fn collect(&mut self, subs: Option<&'a Subs>) {
        let Some(subs) = subs else {
            return;
        };
        for (client, sub) in subs.plain.iter() {
            self.add(client, sub);
        }
        for (_, group) in subs.groups.iter() {
            if let Some((client, sub)) = pick(group) {
                // No Local does not apply to shared subscriptions [MQTT-3.8.3-4].
                let publisher = self.publisher.take();
                self.add(client, sub);
                self.publisher = publisher;
            }
        }
    }
}

/// The next member in turn, preferring connected ones.
fn pick(group: &Group) -> Option<&(Arc<str>, Subscriber)> {
    let n = group.members.len();
    let start = group.next.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|i| &group.members[(start + i) % n])
        .find(|(_, s)| s.mailbox.is_online())
        .or_else(|| group.members.get(start % n.max(1)))
}

/// Matches the levels of `rest` (`None`: no level left) below `node`.
fn walk<'a>(
    node: &'a Node,
    rest: Option<&str>,
    depth: usize,
    dollar: bool,
    found: &mut Found<'a, '_>,
) {
    let wildcards = !(dollar && depth == 0);
    if wildcards {
        // `#` matches this level and everything below, the parent level included.
        found.collect(node.hash.as_deref());
    }
    let Some(rest) = rest else {
        found.collect(node.here.as_deref());
        return;
    };
    let (level, rest) = match rest.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(level) {
        walk(child, rest, depth + 1, dollar, found);
    }
    if wildcards {
        if let Some(child) = node.plus.as_deref() {
            walk(child, rest, depth + 1, dollar, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::filter;
    use super::super::mailbox::{Mailbox, QueueLimits, Totals};
    use super::*;

    fn mailbox() -> Arc<Mailbox> {
        let m = Mailbox::new(
            QueueLimits {
                messages: 10,
                bytes: 1 << 20,
            },
            Totals::new(1 << 30),
        );
        m.set_online(true);
        m
    }

    fn opts(qos: u8) -> Options {
        Options {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    fn clients(targets: &[Target]) -> Vec<String> {
        let mut c: Vec<String> = targets.iter().map(|t| t.client.to_string()).collect();
        c.sort();
        c
    }

    /// The tree agrees with `filter::matches` on every pair of a filter set and a topic set.
    #[test]
    fn the_tree_agrees_with_the_matching_rules() {
        let filters = [
            "#", "a/#", "a/+", "+/b", "a/b", "+", "+/+/c", "$SYS/#", "$SYS/+", "a/b/#", "/+",
            "+/#", "a//b",
        ];
        let topics = [
            "a", "a/b", "a/c", "x/b", "a/b/c", "$SYS/b", "$SYS", "/b", "a/", "a//b", "b",
        ];
        let mut index = Index::default();
        // A session per filter, each with its own mailbox, as the broker makes them.
        let ids: Vec<Arc<str>> = (0..filters.len())
            .map(|i| Arc::from(format!("c{i}")))
            .collect();
        for (i, f) in filters.iter().enumerate() {
            index.insert(None, f, &ids[i], opts(1), &mailbox());
        }
        for t in topics {
            let mut expected: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter::matches(f, t))
                .map(|(i, _)| format!("c{i}"))
                .collect();
            expected.sort();
            assert_eq!(clients(&index.targets(t, None)), expected, "topic {t}");
        }
        for (i, f) in filters.iter().enumerate() {
            assert!(index.remove(None, f, &ids[i]), "{f}");
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn one_delivery_per_session_with_the_highest_qos_and_every_id() {
        let mut index = Index::default();
        let mb = mailbox();
        let c: Arc<str> = Arc::from("c");
        let mut o = opts(0);
        o.id = Some(7);
        index.insert(None, "a/+", &c, o, &mb);
        let mut o = opts(2);
        o.id = Some(9);
        index.insert(None, "a/#", &c, o, &mb);
        let targets = index.targets("a/b", None);
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].qos, 2);
        let mut ids = targets[0].subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![7, 9]);
        // [MQTT-3.8.4-3] subscribing again replaces.
        assert!(index.insert(None, "a/#", &c, opts(1), &mb));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn no_local_skips_the_publisher_only() {
        let mut index = Index::default();
        let mut o = opts(1);
        o.no_local = true;
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        index.insert(None, "t", &a, o, &mailbox());
        index.insert(None, "t", &b, o, &mailbox());
        assert_eq!(clients(&index.targets("t", Some("a"))), vec!["b"]);
    }

    #[test]
    fn a_shared_group_delivers_each_message_to_one_member_in_turn() {
        let mut index = Index::default();
        let members: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("m{i}"))).collect();
        for m in &members {
            index.insert(Some("g"), "s/+", m, opts(1), &mailbox());
        }
        let other: Arc<str> = Arc::from("other");
        index.insert(Some("h"), "s/#", &other, opts(1), &mailbox());
        let mut seen = std::collections::HashMap::new();
        for _ in 0..9 {
            let targets = index.targets("s/x", None);
            // One from group g, one (the only member) from group h.
            assert_eq!(targets.len(), 2);
            for t in targets {
                *seen.entry(t.client.to_string()).or_insert(0) += 1;
            }
        }
        assert_eq!(seen["m0"], 3);
        assert_eq!(seen["m1"], 3);
        assert_eq!(seen["m2"], 3);
        assert_eq!(seen["other"], 9);
        assert!(index.remove(Some("g"), "s/+", "m1"));
        assert!(!index.remove(Some("g"), "s/+", "m1"));
        assert_eq!(index.len(), 3);
    }

    /// A publish's list of targets starts with the room the largest one before needed (up
    /// to a bound), so a steady fan-out never grows it: grown from 8, ten targets took 16
    /// slots and a `realloc` on every message.
    #[test]
    fn the_target_list_starts_with_the_room_a_fan_out_needs() {
        let mut index = Index::default();
        let sessions: Vec<Arc<str>> = (0..30).map(|i| Arc::from(format!("s{i}"))).collect();
        for s in &sessions[..10] {
            index.insert(None, "ten/#", s, opts(1), &mailbox());
        }
        assert_eq!(
            index.targets("nobody", None).capacity(),
            0,
            "no room for no target"
        );
        index.targets("ten/x", None);
        let again = index.targets("ten/x", None);
        assert_eq!(again.len(), 10);
        assert_eq!(again.capacity(), 10);
        for s in &sessions {
            index.insert(None, "all/#", s, opts(1), &mailbox());
        }
        assert_eq!(index.targets("all/x", None).len(), 30);
        let ten = index.targets("ten/x", None);
        assert_eq!(ten.len(), 10);
        assert_eq!(ten.capacity(), TARGETS_ROOM_MAX, "the room is bounded");
    }
}
