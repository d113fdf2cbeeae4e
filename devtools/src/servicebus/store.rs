//! The durable store: one directory per queue, `messages/{seq:020}.json` per message,
//! `state.json` (next sequence number) and `dedup.log` (duplicate-detection history: one
//! line per accepted MessageId, appended, compacted when mostly forgotten entries).
//! A send costs the same whatever the queue holds: no file it writes grows with the
//! number of messages (P5 of BENCHMARKS.md sends tens of thousands).
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
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
    /// MessageId -> time first seen: read from a `state.json` written before
    /// `dedup.log` (then moved there), never written.
    #[serde(default, skip_serializing)]
    dedup: HashMap<String, DateTime<Utc>>,
}

/// The duplicate-detection history: MessageId -> time first seen, with the ids in the
/// order they were seen, so forgetting those past the window costs only what it forgets.
#[derive(Default)]
pub(super) struct Dedup {
    seen: HashMap<String, DateTime<Utc>>,
    order: VecDeque<(DateTime<Utc>, String)>,
}

impl Dedup {
    /// Forgets the ids first seen `window` or longer before `now`.
    pub(super) fn forget_before(&mut self, now: DateTime<Utc>, window: chrono::Duration) {
        while let Some((at, _)) = self.order.front() {
            if now - *at < window {
                break;
            }
            let (at, id) = self.order.pop_front().expect("front exists");
            if self.seen.get(&id) == Some(&at) {
                self.seen.remove(&id);
            }
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    fn insert(&mut self, id: String, at: DateTime<Utc>) {
        self.seen.insert(id.clone(), at);
        self.order.push_back((at, id));
    }

    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// One line of `dedup.log`.
#[derive(Serialize, Deserialize)]
struct Seen {
    id: String,
    at: DateTime<Utc>,
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
    pub(super) dedup: Dedup,
    /// Lines in `dedup.log` (live or forgotten).
    dedup_lines: usize,
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
        let mut meta: QueueMeta = match std::fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => QueueMeta::default(),
        };
        let migrated = !meta.dedup.is_empty();
        let mut seen: Vec<(DateTime<Utc>, String)> =
            meta.dedup.drain().map(|(id, at)| (at, id)).collect();
        let mut dedup_lines = 0;
        if let Ok(log) = std::fs::read(dir.join("dedup.log")) {
            // A torn last line (a crash mid-append) is skipped.
            for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                dedup_lines += 1;
                if let Ok(s) = serde_json::from_slice::<Seen>(line) {
                    seen.push((s.at, s.id));
                }
            }
        }
        seen.sort();
        let mut dedup = Dedup::default();
        for (at, id) in seen {
            dedup.insert(id, at);
        }
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
            dedup,
            dedup_lines,
        };
        let max_seq = q.messages.keys().next_back().copied().unwrap_or(0);
        if q.meta.next_sequence_number <= max_seq {
            q.meta.next_sequence_number = max_seq + 1;
        }
        if q.meta.next_sequence_number < 1 {
            q.meta.next_sequence_number = 1;
        }
        if migrated {
            q.rewrite_dedup_log()?;
            q.save_meta()?;
        }
        Ok(q)
    }

    pub(super) fn save_meta(&self) -> anyhow::Result<()> {
        atomic_write(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&self.meta)?,
        )
    }

    /// Remembers `id` as seen at `at`: appended to `dedup.log`, which is rewritten with
    /// the live entries only once forgotten ones make up most of it.
    pub(super) fn remember(&mut self, id: &str, at: DateTime<Utc>) -> anyhow::Result<()> {
        self.dedup.insert(id.to_string(), at);
        let path = self.dir.join("dedup.log");
        if self.dedup_lines >= 1024 && self.dedup_lines >= 2 * self.dedup.len() {
            return self.rewrite_dedup_log();
        }
        let mut line = serde_json::to_vec(&Seen {
            id: id.to_string(),
            at,
        })?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&line))
            .with_context(|| format!("appending to {}", path.display()))?;
        self.dedup_lines += 1;
        Ok(())
    }

    /// Writes `dedup.log` anew with the live entries only.
    fn rewrite_dedup_log(&mut self) -> anyhow::Result<()> {
        let mut live = Vec::new();
        for (at, id) in &self.dedup.order {
            if self.dedup.seen.get(id) == Some(at) {
                serde_json::to_writer(
                    &mut live,
                    &Seen {
                        id: id.clone(),
                        at: *at,
                    },
                )?;
                live.push(b'\n');
            }
        }
        atomic_write(&self.dir.join("dedup.log"), &live)?;
        self.dedup_lines = self.dedup.len();
        Ok(())
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
