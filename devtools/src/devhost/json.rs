//! Insertion-ordered JSON for the envelopes (the host emits keys in a fixed order; serde_json's
//! default map is sorted, and enabling `preserve_order` would leak into the product's build).

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

#[derive(Clone, Debug)]
pub enum J {
    V(Value),
    O(Vec<(String, J)>),
}

impl J {
    pub fn obj() -> J {
        J::O(Vec::new())
    }

    /// Insert or replace (case-insensitively, keeping the first position) a key.
    pub fn set(&mut self, k: &str, v: impl Into<J>) {
        if let J::O(items) = self {
            let v = v.into();
            if let Some(slot) = items
                .iter_mut()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
            {
                slot.1 = v;
            } else {
                items.push((k.to_string(), v));
            }
        }
    }

    /// Append without the replace check (for keys known to be new).
    pub fn push(&mut self, k: &str, v: impl Into<J>) {
        if let J::O(items) = self {
            items.push((k.to_string(), v.into()));
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            J::V(v) => v.clone(),
            J::O(items) => Value::Object(
                items
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }

    pub fn keys(&self) -> Vec<String> {
        match self {
            J::O(items) => items.iter().map(|(k, _)| k.clone()).collect(),
            J::V(Value::Object(m)) => m.keys().cloned().collect(),
            _ => vec![],
        }
    }
}

impl From<Value> for J {
    fn from(v: Value) -> J {
        J::V(v)
    }
}

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::V(v) => v.serialize(s),
            J::O(items) => {
                let mut m = s.serialize_map(Some(items.len()))?;
                for (k, v) in items {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}
