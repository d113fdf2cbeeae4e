//! The due index: how the timer sweep finds the pending records that need it
//! without reading every pending record.
//!
//! A pending record needs the sweep at its **sweep-due time**
//! ([`DesiredState::sweep_due_at`](super::ledger::DesiredState::sweep_due_at)): when its wake-up message is overdue (due plus a
//! grace: lost, dead-lettered or never sent) or when it is one lease from expiry
//! (time to expire it). Before that, the Service Bus chain looks after it.
//!
//! Each index entry says "look at device `d` at `due_at`". Entries live in
//! [`SHARDS`] partitions chosen by a hash of the device id, sorted by time within a
//! partition, so the sweep reads each shard from its oldest entry up to now with
//! one range query. The record stays the truth; an entry is only a reminder.
//!
//! **The invariants.** Every pending record has at least one entry at or before its
//! sweep-due time, and the entry it names exists. They are kept without a
//! cross-partition transaction (`functions::index` has the writers' side):
//! - each record version names the entry that covers it. A writer files the entry
//!   *before* its conditional record write (a crash between the two leaves at worst an
//!   extra entry) and, once the write committed, removes the entry the replaced version
//!   named. So an entry moves with its record: a wake-up chain that moves the record's
//!   time later moves its entry too, and settling a record removes it;
//! - the sweep removes only entries it listed, after a conditional write at the
//!   version of the record it read (a fence, or a rewrite naming a new entry): a write
//!   in flight conditional on what it read cannot commit afterwards. If the record is
//!   pending, it is covered first, by the entry it names if that is still ahead, else
//!   by a new one it is rewritten to name;
//! - every entry's row key carries a nonce, so an entry the sweep removes is never
//!   one a writer files after the sweep listed the index;
//! - the sweep never removes an entry filed less than one lease ago: its writer may
//!   still be on its way to the record.
//!
//! Extra entries (a crash after filing, a removal that failed) are harmless: the sweep
//! meets them, reads the record and drops them. A reconciling pass
//! ([`crate::functions::drain_soc_timer`]) files an entry for every pending record that
//! names none (written before entries were named), once per interval.

use chrono::{DateTime, SecondsFormat, Utc};

use super::input::DeviceId;

/// Number of index partitions. A fixed part of the storage layout: changing it
/// strands the entries of the old shards until the reconciling pass re-files them.
pub const SHARDS: u8 = 16;

/// Partition key prefix of index entries. `!` cannot start a device id, so an
/// index partition never mixes with a device's partition.
pub const PARTITION_PREFIX: &str = "!due-";

/// "Look at `device_id` at `due_at`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueEntry {
    pub device_id: DeviceId,
    pub due_at: DateTime<Utc>,
    /// Makes the row key unique to one filing (see the module docs).
    pub nonce: String,
    /// When it was filed, by the filer's clock (`None`: unknown, treated as long ago).
    /// The sweep never removes an entry younger than one lease (see the module docs).
    pub filed_at: Option<DateTime<Utc>>,
}

impl DueEntry {
    /// A new entry with a fresh nonce, due at `due_at` rounded down to the millisecond
    /// (what its row key holds: never later than asked, so it still covers the record).
    pub fn new(device_id: DeviceId, due_at: DateTime<Utc>) -> Self {
        let due_at = DateTime::from_timestamp_millis(due_at.timestamp_millis()).unwrap_or(due_at);
        Self {
            device_id,
            due_at,
            nonce: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            filed_at: None,
        }
    }

    /// The same entry, filed at `at`.
    pub fn filed(mut self, at: DateTime<Utc>) -> Self {
        self.filed_at = Some(at);
        self
    }

    /// Whether a write that filed this entry may still be on its way to the record:
    /// filed less than `window` before `now`.
    pub fn is_young(&self, now: DateTime<Utc>, window: chrono::Duration) -> bool {
        self.filed_at.is_some_and(|at| at + window > now)
    }

    pub fn shard(&self) -> u8 {
        shard_of(&self.device_id)
    }

    pub fn partition_key(&self) -> String {
        partition_key(self.shard())
    }

    /// `{due_at, RFC 3339 to the millisecond}~{device}~{nonce}`: sorts by time.
    pub fn row_key(&self) -> String {
        format!(
            "{}~{}~{}",
            time_key(self.due_at),
            self.device_id.as_str(),
            self.nonce
        )
    }

    /// The entry a row key names (`None` if it is not one of ours).
    pub fn from_row_key(row_key: &str) -> Option<Self> {
        let mut parts = row_key.splitn(3, '~');
        let due_at = DateTime::parse_from_rfc3339(parts.next()?).ok()?;
        let device_id = DeviceId::parse(parts.next()?).ok()?;
        let nonce = parts.next()?.to_string();
        Some(Self {
            device_id,
            due_at: due_at.with_timezone(&Utc),
            nonce,
            filed_at: None,
        })
    }
}

/// Most entries one batch filing ([`crate::ports::Ledger::file_due_batch`]) writes: a
/// Table entity-group transaction holds at most 100 operations, all in one partition.
pub const MAX_BATCH: usize = 100;

/// `entries` grouped for batch filing: by shard, at most [`MAX_BATCH`] a group, each
/// group in the order the entries came, the groups in the order of their first entry.
pub fn batches(entries: Vec<DueEntry>) -> Vec<Vec<DueEntry>> {
    let mut groups: Vec<Vec<DueEntry>> = Vec::new();
    let mut open: [Option<usize>; SHARDS as usize] = [None; SHARDS as usize];
    for entry in entries {
        let shard = usize::from(entry.shard());
        match open[shard] {
            Some(g) if groups[g].len() < MAX_BATCH => groups[g].push(entry),
            _ => {
                open[shard] = Some(groups.len());
                groups.push(vec![entry]);
            }
        }
    }
    groups
}

/// The partition key of shard `shard`.
pub fn partition_key(shard: u8) -> String {
    format!("{PARTITION_PREFIX}{shard:02}")
}

/// The row key bound that lists a shard's entries due at or before `until`
/// (`RowKey lt bound`): `~` sorts after every character of a time key.
pub fn row_key_bound(until: DateTime<Utc>) -> String {
    format!("{}~~", time_key(until))
}

/// Fixed-width, so that string order is time order (years 0000-9999).
fn time_key(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The shard of a device: FNV-1a over its id (stable across builds and platforms).
pub fn shard_of(device: &DeviceId) -> u8 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in device.as_str().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(SHARDS)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn an_entry_is_young_for_exactly_its_window_after_it_was_filed() {
        let e = DueEntry::new(id("bat-1"), t(0)).filed(t(1_000));
        let window = Duration::seconds(15);
        assert!(e.is_young(t(1_000), window));
        assert!(e.is_young(t(15_999), window));
        assert!(!e.is_young(t(16_000), window));
        assert!(
            !DueEntry::new(id("bat-1"), t(0)).is_young(t(0), window),
            "unknown: not young"
        );
    }

    #[test]
    fn a_row_key_reads_back_as_the_entry_it_names() {
        let e = DueEntry::new(id("bat-1.a_b"), t(123));
        assert_eq!(DueEntry::from_row_key(&e.row_key()), Some(e.clone()));
        assert_eq!(e.partition_key(), partition_key(shard_of(&id("bat-1.a_b"))));
        assert!(e.partition_key().starts_with("!due-"));
        assert_eq!(DueEntry::from_row_key("desired"), None);
    }

    #[test]
    fn an_index_row_naming_an_all_dots_device_is_not_an_entry() {
        let key = DueEntry::new(id("bat-1"), t(123)).row_key();
        for dots in [".", ".."] {
            let forged = key.replacen("~bat-1~", &format!("~{dots}~"), 1);
            assert_ne!(forged, key);
            assert_eq!(DueEntry::from_row_key(&forged), None, "{forged}");
        }
    }

    #[test]
    fn row_keys_sort_by_time_and_the_bound_includes_exactly_what_is_due() {
        let early = DueEntry::new(id("zzz"), t(0));
        let later = DueEntry::new(id("aaa"), t(1));
        let much_later = DueEntry::new(id("aaa"), t(0) + Duration::days(400));
        assert!(early.row_key() < later.row_key());
        assert!(later.row_key() < much_later.row_key());
        let bound = row_key_bound(t(1));
        assert!(early.row_key() < bound && later.row_key() < bound);
        assert!(DueEntry::new(id("a"), t(2)).row_key() > bound);
    }

    #[test]
    fn an_entry_is_due_at_its_time_rounded_down_to_what_its_row_key_holds() {
        let at = Utc.timestamp_opt(1_800_000_000, 987_654_321).unwrap();
        let e = DueEntry::new(id("d"), at);
        assert!(e.due_at <= at && at - e.due_at < Duration::milliseconds(1));
        assert_eq!(
            DueEntry::from_row_key(&e.row_key()).unwrap().due_at,
            e.due_at
        );
    }

    #[test]
    fn filings_of_the_same_device_and_time_never_share_a_row_key() {
        let a = DueEntry::new(id("d"), t(5));
        let b = DueEntry::new(id("d"), t(5));
        assert_ne!(a.row_key(), b.row_key());
    }

    #[test]
    fn batches_hold_one_shard_each_at_most_a_hundred_and_keep_every_entry_once() {
        let entries: Vec<DueEntry> = (0..2000)
            .map(|i| DueEntry::new(id(&format!("bat-{i}")), t(i)))
            .collect();
        let groups = batches(entries.clone());
        assert!(groups.iter().all(|g| !g.is_empty() && g.len() <= MAX_BATCH));
        assert!(groups
            .iter()
            .all(|g| g.iter().all(|e| e.shard() == g[0].shard())));
        let mut keys: Vec<String> = groups.iter().flatten().map(DueEntry::row_key).collect();
        let mut want: Vec<String> = entries.iter().map(DueEntry::row_key).collect();
        keys.sort();
        want.sort();
        assert_eq!(keys, want);
        // About 125 a shard: two groups each.
        assert!(groups.len() <= 2 * usize::from(SHARDS), "{}", groups.len());
        assert!(batches(Vec::new()).is_empty());
    }

    #[test]
    fn devices_spread_over_every_shard() {
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..16_000 {
            counts[shard_of(&id(&format!("bat-{i}"))) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(shard_of(&id("bat-42")), shard_of(&id("bat-42")));
    }
}
