//! The durable store: one directory per queue, `messages/{seq:020}.json` per message and
//! `state.json` (next sequence number, duplicate-detection history).
//!
//! Invariants:
//! - Every write goes to a temp file that is then renamed over the target, so a reader (or a
//!   restart) sees the old or the new file, never a torn one; leftover temp files are deleted on
//!   open. Writes are not fsynced.
//! - On open, the next sequence number is above every stored message's, so sequence numbers are
//!   never reused, even if `state.json` was lost.
//! - Locks live in memory only: after a restart every stored, non-dead-lettered message is
//!   deliverable again (as after a lock expiry).
//! - Completing or purging deletes the file; dead-lettering rewrites it with the reason and keeps it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::message::StoredMessage;

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct QueueMeta {
    pub(super) next_sequence_number: i64,
    /// MessageId -> time first seen.
    pub(super) dedup: HashMap<String, DateTime<Utc>>,
}

/// A peek-lock held by one delivery (in memory only).
pub(super) struct Lock {
    pub(super) token: Uuid,
    pub(super) until: DateTime<Utc>,
}

/// One queue: its stored messages, the locks held on them, and its metadata.
pub(super) struct QueueState {
    dir: PathBuf,
    pub(super) messages: BTreeMap<i64, StoredMessage>,
    pub(super) locks: HashMap<i64, Lock>,
    pub(super) meta: QueueMeta,
}

fn atomic_write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn msg_path(dir: &Path, seq: i64) -> PathBuf {
    dir.join("messages").join(format!("{seq:020}.json"))
}

impl QueueState {
    pub(super) fn open(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("messages"))?;
        let meta: QueueMeta = match std::fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => QueueMeta::default(),
        };
        let mut messages = BTreeMap::new();
        for e in std::fs::read_dir(dir.join("messages"))? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                // leftover temp file of an interrupted write
                let _ = std::fs::remove_file(&p);
                continue;
            }
            let m: StoredMessage = serde_json::from_slice(&std::fs::read(&p)?)
                .with_context(|| format!("reading {}", p.display()))?;
            messages.insert(m.sequence_number, m);
        }
        let mut q = QueueState {
            dir,
            messages,
            locks: HashMap::new(),
            meta,
        };
        let max_seq = q.messages.keys().next_back().copied().unwrap_or(0);
        if q.meta.next_sequence_number <= max_seq {
            q.meta.next_sequence_number = max_seq + 1;
        }
        if q.meta.next_sequence_number < 1 {
            q.meta.next_sequence_number = 1;
        }
        Ok(q)
    }

    pub(super) fn save_meta(&self) -> anyhow::Result<()> {
        atomic_write(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&self.meta)?,
        )
    }

    pub(super) fn save_msg(&self, m: &StoredMessage) -> anyhow::Result<()> {
        atomic_write(
            &msg_path(&self.dir, m.sequence_number),
            &serde_json::to_vec_pretty(m)?,
        )
    }

    pub(super) fn delete_msg(&mut self, seq: i64) {
        self.messages.remove(&seq);
        self.locks.remove(&seq);
        let _ = std::fs::remove_file(msg_path(&self.dir, seq));
    }

    pub(super) fn dead_letter(
        &mut self,
        seq: i64,
        reason: &str,
        description: &str,
        now: DateTime<Utc>,
    ) {
        self.locks.remove(&seq);
        if let Some(m) = self.messages.get_mut(&seq) {
            m.dead_lettered = true;
            m.dead_letter_reason = Some(reason.to_string());
            m.dead_letter_error_description = Some(description.to_string());
            m.dead_lettered_at = Some(now);
            tracing::warn!(
                seq,
                message_id = %m.message_id,
                reason,
                "servicebus: message dead-lettered"
            );
            let m = m.clone();
            if let Err(e) = self.save_msg(&m) {
                tracing::error!("servicebus: persisting dead-letter failed: {e:#}");
            }
        }
    }
}
