//! A map for the broker's many tiny sets (the index's nodes and subscriber sets, a
//! session's subscriptions): a list while it holds a few entries (most nodes of
//! a fleet's command topics have one child and one subscriber), a hash table once it holds
//! many (the level under `devices/` with one child per device, a filter every device
//! subscribes to). A one-entry `HashMap` costs 120-190 bytes; a one-entry list, its entry.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Entries a list holds before it becomes a table: a scan of this many short keys costs
/// less than hashing one.
const FEW: usize = 16;

#[derive(Debug)]
pub enum SmallMap<K, V> {
    Few(Vec<(K, V)>),
    /// Boxed so the map is the size of a `Vec` (24 bytes, not 48) in every node and set.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K: Borrow<str> + Eq + Hash, V> SmallMap<K, V> {
    pub fn len(&self) -> usize {
        match self {
            SmallMap::Few(list) => list.len(),
            SmallMap::Many(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        match self {
            SmallMap::Few(list) => list.iter().find(|(k, _)| k.borrow() == key).map(|(_, v)| v),
            SmallMap::Many(map) => map.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        match self {
            SmallMap::Few(list) => list
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            SmallMap::Many(map) => map.get_mut(key),
        }
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(existing) = self.get_mut(key.borrow()) {
            return Some(std::mem::replace(existing, value));
        }
        self.push(key, value);
        None
    }

    /// The value under `key`, made with `make` if there is none.
    pub fn get_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V
    where
        K: for<'a> From<&'a str>,
    {
        // Looked up twice when absent: the borrow checker cannot return a found reference
        // and fall through to an insert in one pass.
        if self.get(key).is_none() {
            self.push(K::from(key), make());
        }
        match self.get_mut(key) {
            Some(v) => v,
            None => unreachable!("inserted above"),
        }
    }

    /// Adds an entry known to be absent.
    fn push(&mut self, key: K, value: V) {
        match self {
            SmallMap::Few(list) if list.len() < FEW => {
                // Grown one at a time: most stop at one or two.
                list.reserve_exact(1);
                list.push((key, value));
            }
            SmallMap::Few(list) => {
                let mut map: HashMap<K, V> = std::mem::take(list).into_iter().collect();
                map.insert(key, value);
                *self = SmallMap::Many(Box::new(map));
            }
            SmallMap::Many(map) => {
                map.insert(key, value);
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        match self {
            SmallMap::Few(list) => {
                let at = list.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, v) = list.swap_remove(at);
                if list.is_empty() {
                    *list = Vec::new();
                }
                Some(v)
            }
            SmallMap::Many(map) => map.remove(key),
        }
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Few(list) => Iter::Few(list.iter()),
            SmallMap::Many(map) => Iter::Many(map.iter()),
        }
    }
}

impl<K: Borrow<str> + Eq + Hash, V> FromIterator<(K, V)> for SmallMap<K, V> {
    /// Keys are taken as distinct (a later one replaces an earlier).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> SmallMap<K, V> {
        let mut map = SmallMap::default();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

/// [`SmallMap::iter`]: no allocation on the fan-out path.
pub enum Iter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(it) => it.next().map(|(k, v)| (k, v)),
            Iter::Many(it) => it.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_as_a_map_below_and_above_the_switch_to_a_table() {
        let mut small: SmallMap<Box<str>, usize> = SmallMap::default();
        let mut model = BTreeMap::new();
        // Inserts past FEW (the switch), replaces, removes down to nothing, and again.
        for round in 0..2 {
            for i in 0..(FEW * 2) {
                let key = format!("k{i}");
                assert_eq!(
                    small.insert(key.as_str().into(), i + round),
                    model.insert(key, i + round)
                );
                assert_eq!(small.len(), model.len());
            }
            for i in (0..(FEW * 2)).step_by(3) {
                let key = format!("k{i}");
                assert_eq!(small.remove(&key), model.remove(&key));
                assert_eq!(small.remove(&key), None);
            }
            *small.get_or_insert_with("new", || 7) += 1;
            *model.entry("new".to_owned()).or_insert(7) += 1;
            for (k, v) in &model {
                assert_eq!(small.get(k), Some(v));
            }
            let mut seen: Vec<(String, usize)> =
                small.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            seen.sort();
            let want: Vec<(String, usize)> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
            assert_eq!(seen, want);
            let keys: Vec<String> = model.keys().cloned().collect();
            for key in keys {
                assert_eq!(small.remove(&key), model.remove(&key));
            }
            assert!(small.is_empty());
        }
    }

    #[test]
    fn a_one_entry_map_is_a_list_of_one() {
        let mut small: SmallMap<Box<str>, u8> = SmallMap::default();
        small.insert("commands".into(), 1);
        match &small {
            SmallMap::Few(list) => assert_eq!(list.capacity(), 1),
            SmallMap::Many(_) => panic!("one entry is not many"),
        }
    }
}
