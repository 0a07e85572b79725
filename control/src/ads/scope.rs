//! What a stream subscribed to of one resource type, kept small: the names among the
//! shared resources as bits over their positions.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::translate::{NameIndex, NamedResource};

/// A type's subscription: everything (wildcard), or names. Names among the shared
/// resources are bits over their positions (a [`NameIndex`]), so a proxy subscribed to
/// every endpoint of a thousand services costs a stream 125 bytes, not a thousand strings;
/// other names (the proxy's own resources, routes, names that do not exist) are kept as
/// they are.
#[derive(Debug, Clone, Default)]
pub(super) struct Scope {
    pub(super) wildcard: bool,
    bits: Vec<u64>,
    pub(super) index: Option<Arc<NameIndex>>,
    pub(super) extra: BTreeSet<String>,
}

impl Scope {
    /// A state-of-the-world subscription: `names` as a request lists them (for listeners and
    /// clusters, none means all), over `index`.
    pub(super) fn listed(
        wildcard_type: bool,
        names: &[String],
        index: Option<&Arc<NameIndex>>,
    ) -> Scope {
        let mut scope = Scope {
            wildcard: (wildcard_type && names.is_empty()) || names.iter().any(|n| n == "*"),
            index: index.cloned(),
            ..Scope::default()
        };
        if !scope.wildcard {
            for name in names {
                scope.insert(name);
            }
        }
        scope
    }

    /// Whether both name the same resources.
    pub(super) fn same(&self, other: &Scope) -> bool {
        let index_same = match (&self.index, &other.index) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        fn trimmed(bits: &[u64]) -> &[u64] {
            let end = bits.iter().rposition(|w| *w != 0).map_or(0, |i| i + 1);
            &bits[..end]
        }
        if self.wildcard || other.wildcard {
            return self.wildcard == other.wildcard;
        }
        index_same && trimmed(&self.bits) == trimmed(&other.bits) && self.extra == other.extra
    }

    fn bit(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    fn set_bit(&mut self, i: usize, on: bool) {
        let w = i / 64;
        if self.bits.len() <= w {
            if !on {
                return;
            }
            self.bits.resize(w + 1, 0);
        }
        if on {
            self.bits[w] |= 1 << (i % 64);
        } else {
            self.bits[w] &= !(1 << (i % 64));
        }
    }

    /// Whether `name` is subscribed; `at` is its position among shared resources indexed
    /// by an index, when it is one of them (a bit to test when that is this scope's index).
    pub(super) fn covers(&self, name: &str, at: Option<(usize, &Arc<NameIndex>)>) -> bool {
        if self.wildcard {
            return true;
        }
        match (at, &self.index) {
            (Some((i, index)), Some(mine)) if Arc::ptr_eq(index, mine) => self.bit(i),
            _ => {
                self.extra.contains(name)
                    || self
                        .index
                        .as_ref()
                        .and_then(|ix| ix.position(name))
                        .is_some_and(|i| self.bit(i))
            }
        }
    }

    pub(super) fn insert(&mut self, name: &str) {
        match self.index.as_ref().and_then(|ix| ix.position(name)) {
            Some(i) => self.set_bit(i, true),
            None => {
                self.extra.insert(name.to_string());
            }
        }
    }

    pub(super) fn remove(&mut self, name: &str) {
        match self.index.as_ref().and_then(|ix| ix.position(name)) {
            Some(i) => self.set_bit(i, false),
            None => {
                self.extra.remove(name);
            }
        }
    }

    /// Names subscribed (wildcard aside).
    pub(super) fn len(&self) -> usize {
        self.bits
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
            + self.extra.len()
    }

    /// Moves the names onto `index`, the shared resources' index now; `old` is the list
    /// the bits referred to.
    pub(super) fn rebase(&mut self, old: &[NamedResource], index: Option<&Arc<NameIndex>>) {
        let same = match (&self.index, index) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let bits = std::mem::take(&mut self.bits);
        let mut names: Vec<String> = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            for b in 0..64 {
                if (word >> b) & 1 == 1
                    && let Some(r) = old.get(w * 64 + b)
                {
                    names.push(r.name.clone());
                }
            }
        }
        let extra = std::mem::take(&mut self.extra);
        self.index = index.cloned();
        for name in names.iter().chain(&extra) {
            self.insert(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_api::pb::google::protobuf::Any;

    fn named(names: &[&str]) -> Vec<NamedResource> {
        names
            .iter()
            .map(|n| NamedResource::new((*n).to_string(), Any::default()))
            .collect()
    }

    #[test]
    fn a_scope_keeps_shared_names_as_bits_and_carries_them_to_a_new_index() {
        let old = named(&["a", "b", "c"]);
        let old_index = NameIndex::for_tests(&old);
        let mut scope = Scope {
            index: Some(old_index.clone()),
            ..Scope::default()
        };
        scope.insert("b");
        scope.insert("later");
        assert!(scope.covers("b", Some((1, &old_index))));
        assert!(!scope.covers("a", Some((0, &old_index))));
        assert!(scope.covers("later", None));
        assert_eq!((scope.len(), scope.extra.len()), (2, 1));
        // A new list: b moved, the name that did not exist now does.
        let new = named(&["later", "c", "b"]);
        let new_index = NameIndex::for_tests(&new);
        scope.rebase(&old, Some(&new_index));
        assert!(scope.covers("b", Some((2, &new_index))));
        assert!(scope.covers("later", Some((0, &new_index))));
        assert!(!scope.covers("c", Some((1, &new_index))));
        assert!(scope.extra.is_empty(), "{:?}", scope.extra);
        scope.remove("b");
        assert_eq!(scope.len(), 1);
    }

    #[test]
    fn a_listed_subscription_is_the_same_as_another_naming_the_same_resources() {
        let list = named(&["a", "b", "c"]);
        let index = NameIndex::for_tests(&list);
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        let ab = Scope::listed(false, &names(&["a", "b"]), Some(&index));
        assert!(ab.same(&Scope::listed(false, &names(&["b", "a"]), Some(&index))));
        assert!(!ab.same(&Scope::listed(false, &names(&["a"]), Some(&index))));
        assert!(!ab.same(&Scope::listed(
            false,
            &names(&["a", "b", "x"]),
            Some(&index)
        )));
        // Listeners and clusters: no names is everything, as "*" is for any type.
        let all = Scope::listed(true, &[], Some(&index));
        assert!(all.wildcard && all.covers("c", Some((2, &index))));
        assert!(all.same(&Scope::listed(false, &names(&["*"]), None)));
        assert!(!all.same(&ab));
        assert!(!Scope::listed(false, &[], Some(&index)).covers("a", Some((0, &index))));
    }
}
