//! The Table Storage ledger against a real Azurite (see `testkit::azurite`).
//! Tests share one Azurite process while they run and each uses its own table.

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use soc_settings::adapters::connection_string::StorageConnection;
use soc_settings::adapters::table_ledger::TableLedger;
use soc_settings::domain::history::{HistoryEntry, HISTORY_KEPT_AT_MOST, HISTORY_LIMIT};
use soc_settings::domain::ledger::{Lease, LeaseHolder};
use soc_settings::domain::notification::Notification;
use soc_settings::domain::{
    DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId, RequestStatus,
    IDEMPOTENCY_KEY_RETENTION,
};
use soc_settings::ports::{ETag, IdempotencyRecord, KeyWrite, Ledger, Precondition, StoreError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use testkit::azurite::{self, Azurite};

fn unique_table(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn ledger_on(azurite: &Azurite, table: &str) -> TableLedger {
    let conn = StorageConnection::parse(&azurite.connection_string()).unwrap();
    TableLedger::new(&conn, table).unwrap()
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 987_654_321)
        .unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

fn pending(id: &str, min_soc: u8) -> DesiredState {
    DesiredState::accept(
        device(id),
        MinSoc::new(min_soc).unwrap(),
        t(0),
        chrono::Duration::days(7),
        None,
    )
}

/// Every field set, including the optional ones.
fn everything_set(id: &str) -> DesiredState {
    DesiredState {
        device_id: device(id),
        request_id: RequestId::new_random(),
        min_soc: MinSoc::new(42).unwrap(),
        status: RequestStatus::Applied,
        requested_at: t(0),
        expires_at: t(604_800),
        applied_at: Some(t(12)),
        attempts: 4_000_000_000,
        last_error: Some("HTTP 422: value 'x' rejected / ü ✓".into()),
        wake_message_id: Some("req:wake-3".into()),
        wake_due_at: Some(t(300)),
        lease: Some(Lease {
            holder: LeaseHolder::from_stored("invocation-17"),
            until: t(45),
        }),
        updated_at: t(13),
        due_entry: Some(format!("2027-01-15T08:05:00.000Z~{id}~0a1b2c3d4e5f")),
        unpruned: 9,
        pruned_at: Some(t(2)),
        last_event_seq: 9_000_000_000,
        confirmed_at: Some(t(14)),
        reported_min_soc: Some(0),
        drift_detected_at: Some(t(15)),
    }
}

#[tokio::test]
async fn a_desired_state_with_every_field_round_trips_losslessly() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("roundtrip"));
    let state = everything_set("bat-rt");

    let etag = ledger.put(&state, None, &[]).await.unwrap();
    let read = ledger.get(&state.device_id).await.unwrap().unwrap();

    assert_eq!(read.value, state);
    assert_eq!(read.etag, etag);

    let minimal = pending("bat-rt-2", 0);
    ledger.put(&minimal, None, &[]).await.unwrap();
    assert_eq!(
        ledger.get(&minimal.device_id).await.unwrap().unwrap().value,
        minimal
    );
}

#[tokio::test]
async fn every_write_keeps_its_requests_history_entry_in_the_same_transaction() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("history"));
    let dev = device("bat-h");
    let mut a = pending("bat-h", 10);
    a.take_lease(
        &LeaseHolder::from_stored("http-1"),
        t(0),
        chrono::Duration::seconds(30),
    );
    let a_etag = ledger.put(&a, None, &[]).await.unwrap();
    let entry = ledger
        .history_entry(&dev, &a.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.request.request_id, a.request_id);
    assert_eq!(
        entry.request.lease, None,
        "coordination fields stay out of the history"
    );
    assert_eq!(entry.superseded_by, None);

    // B replaces A while it is pending: both entries in the write that stores B.
    let b = DesiredState::accept(
        dev.clone(),
        MinSoc::new(20).unwrap(),
        t(10),
        chrono::Duration::days(7),
        Some(&a),
    );
    let replaced = HistoryEntry::replaced(&a, &b.request_id, t(10));
    let b_etag = ledger
        .accept(
            &b,
            Some(&replaced),
            None,
            &Precondition::Record(a_etag.clone()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ledger.get(&dev).await.unwrap().unwrap().etag, b_etag);
    let entry = ledger
        .history_entry(&dev, &a.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.superseded_by.as_ref(), Some(&b.request_id));
    assert_eq!(entry.request.min_soc.percent(), 10);
    assert!(ledger
        .history_entry(&dev, &b.request_id)
        .await
        .unwrap()
        .is_some());

    // A write that loses the race (stale ETag) changes nothing, history included.
    let c = DesiredState::accept(
        dev.clone(),
        MinSoc::new(30).unwrap(),
        t(20),
        chrono::Duration::days(7),
        Some(&b),
    );
    let replaced = HistoryEntry::replaced(&b, &c.request_id, t(20));
    assert_eq!(
        ledger
            .accept(
                &c,
                Some(&replaced),
                None,
                &Precondition::Record(a_etag.clone()),
                &[]
            )
            .await,
        Err(StoreError::Conflict)
    );
    assert_eq!(
        ledger.history_entry(&dev, &c.request_id).await.unwrap(),
        None
    );
    let entry = ledger
        .history_entry(&dev, &b.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.superseded_by, None, "B was not superseded");
    assert_eq!(
        ledger.put(&c, None, &[]).await,
        Err(StoreError::Conflict),
        "an insert over the record"
    );
    assert_eq!(
        ledger.history_entry(&dev, &c.request_id).await.unwrap(),
        None
    );

    // Later writes of B (applied) update its entry with the record.
    let mut applied = b.clone();
    applied.mark_applied(t(30));
    ledger.put(&applied, Some(&b_etag), &[]).await.unwrap();
    let entry = ledger
        .history_entry(&dev, &b.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.request.status, RequestStatus::Applied);
    assert_eq!(entry.request.applied_at, Some(t(30)));
}

#[tokio::test]
async fn a_device_keeps_its_newest_twenty_requests_pruning_once_every_ten() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("bound"));
    let dev = device("bat-b");
    let mut previous: Option<(DesiredState, ETag)> = None;
    let mut ids = Vec::new();
    // Request 30 is the third that prunes: the first two found nothing beyond twenty.
    for i in 0..(HISTORY_KEPT_AT_MOST as i64 + 1) {
        let prev = previous.as_ref().map(|(s, _)| s);
        let next = DesiredState::accept(
            dev.clone(),
            MinSoc::new(50).unwrap(),
            t(i),
            chrono::Duration::days(7),
            prev,
        );
        let replaced = prev.map(|p| HistoryEntry::replaced(p, &next.request_id, t(i)));
        let on = match &previous {
            Some((_, e)) => Precondition::Record(e.clone()),
            None => Precondition::Anchor(ledger.anchor(&dev).await.unwrap()),
        };
        let etag = ledger
            .accept(&next, replaced.as_ref(), None, &on, &[])
            .await
            .unwrap();
        ids.push(next.request_id.clone());
        previous = Some((next, etag));
    }
    let pruned = ids.len() - HISTORY_LIMIT;
    for (i, id) in ids.iter().enumerate() {
        let kept = ledger.history_entry(&dev, id).await.unwrap().is_some();
        assert_eq!(kept, i >= pruned, "request {i}");
    }
}

#[tokio::test]
async fn a_device_without_a_record_reads_as_none() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("none"));
    assert_eq!(ledger.get(&device("nobody")).await.unwrap(), None);
}

#[tokio::test]
async fn inserting_over_an_existing_record_is_a_conflict() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("insert"));
    let first = pending("bat-ins", 30);
    ledger.put(&first, None, &[]).await.unwrap();

    let second = pending("bat-ins", 60);
    assert_eq!(
        ledger.put(&second, None, &[]).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(
        ledger.get(&first.device_id).await.unwrap().unwrap().value,
        first
    );
}

#[tokio::test]
async fn a_replace_with_a_stale_etag_is_a_conflict_and_the_first_writer_wins() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("replace"));
    let original = pending("bat-rep", 30);
    let etag0 = ledger.put(&original, None, &[]).await.unwrap();

    let mut a = original.clone();
    a.min_soc = MinSoc::new(50).unwrap();
    let etag1 = ledger.put(&a, Some(&etag0), &[]).await.unwrap();
    assert_ne!(etag1, etag0);

    let mut b = original.clone();
    b.min_soc = MinSoc::new(70).unwrap();
    assert_eq!(
        ledger.put(&b, Some(&etag0), &[]).await,
        Err(StoreError::Conflict)
    );

    let stored = ledger.get(&original.device_id).await.unwrap().unwrap();
    assert_eq!(stored.value, a);
    assert_eq!(stored.etag, etag1);
    // The fresh ETag works.
    ledger.put(&b, Some(&stored.etag), &[]).await.unwrap();
}

#[tokio::test]
async fn a_fence_consumes_the_etag_so_a_write_conditional_on_it_never_commits() {
    // Issue 17, case 1: an accepting write delayed in the network must not commit
    // after the POST answered 503.
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("fence"));
    let dev = device("bat-fence");
    // A device's first request is conditional on its anchor row.
    let anchor = Precondition::Anchor(ledger.anchor(&dev).await.unwrap());
    assert_eq!(
        Precondition::Anchor(ledger.anchor(&dev).await.unwrap()),
        anchor,
        "the anchor is created once"
    );
    let a = pending("bat-fence", 10);
    ledger.fence(&dev, &anchor).await.unwrap();
    assert_eq!(
        ledger.accept(&a, None, None, &anchor, &[]).await,
        Err(StoreError::Conflict),
        "the fenced first write"
    );
    assert_eq!(ledger.get(&dev).await.unwrap(), None);
    assert_eq!(
        ledger.history_entry(&dev, &a.request_id).await.unwrap(),
        None
    );
    assert_eq!(ledger.fence(&dev, &anchor).await, Err(StoreError::Conflict));

    let anchor = Precondition::Anchor(ledger.anchor(&dev).await.unwrap());
    let a_etag = ledger.accept(&a, None, None, &anchor, &[]).await.unwrap();
    assert_eq!(
        ledger.fence(&dev, &anchor).await,
        Err(StoreError::Conflict),
        "the accepted write consumed the anchor"
    );
    assert!(ledger
        .history_entry(&dev, &a.request_id)
        .await
        .unwrap()
        .is_some());
    let on_a = Precondition::Record(a_etag.clone());
    ledger.fence(&dev, &on_a).await.unwrap();
    let stored = ledger.get(&dev).await.unwrap().unwrap();
    assert_eq!(stored.value, a, "a fence changes nothing but the ETag");
    assert_ne!(stored.etag, a_etag);
    let b = DesiredState::accept(
        dev.clone(),
        MinSoc::new(20).unwrap(),
        t(10),
        chrono::Duration::days(7),
        Some(&a),
    );
    assert_eq!(
        ledger.accept(&b, None, None, &on_a, &[]).await,
        Err(StoreError::Conflict),
        "the fenced replace"
    );
    assert_eq!(
        ledger.history_entry(&dev, &b.request_id).await.unwrap(),
        None
    );
    ledger
        .accept(&b, None, None, &Precondition::Record(stored.etag), &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_key_row_is_written_with_its_request_and_a_second_first_use_stores_nothing() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("keytx"));
    let dev = device("bat-key");
    let a = pending("bat-key", 10);
    let key = IdempotencyKey::parse(b"k/1#?").unwrap();
    let row = |request: &DesiredState, at| IdempotencyRecord {
        device_id: dev.clone(),
        key: key.clone(),
        fingerprint: "minSoc=10".into(),
        request_id: request.request_id.clone(),
        created_at: at,
    };
    let anchor = Precondition::Anchor(ledger.anchor(&dev).await.unwrap());
    let a_key = row(&a, t(0));
    let a_etag = ledger
        .accept(
            &a,
            None,
            Some(KeyWrite {
                record: &a_key,
                replaces: None,
            }),
            &anchor,
            &[],
        )
        .await
        .unwrap();
    let read = ledger.get_idempotency(&dev, &key).await.unwrap().unwrap();
    assert_eq!(read.value, a_key);
    // A concurrent first use of the same key: its request is not stored either.
    let b = DesiredState::accept(
        dev.clone(),
        MinSoc::new(10).unwrap(),
        t(1),
        chrono::Duration::days(7),
        Some(&a),
    );
    let b_key = row(&b, t(1));
    assert_eq!(
        ledger
            .accept(
                &b,
                None,
                Some(KeyWrite {
                    record: &b_key,
                    replaces: None
                }),
                &Precondition::Record(a_etag.clone()),
                &[]
            )
            .await,
        Err(StoreError::Conflict)
    );
    assert_eq!(ledger.get(&dev).await.unwrap().unwrap().value, a);
    assert_eq!(
        ledger.history_entry(&dev, &b.request_id).await.unwrap(),
        None
    );
    // An expired row is replaced at its ETag, in the same write.
    ledger
        .accept(
            &b,
            None,
            Some(KeyWrite {
                record: &b_key,
                replaces: Some(&read.etag),
            }),
            &Precondition::Record(a_etag),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        ledger
            .get_idempotency(&dev, &key)
            .await
            .unwrap()
            .unwrap()
            .value,
        b_key
    );
}

#[tokio::test]
async fn key_rows_past_their_retention_are_deleted_after_a_later_request() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("keyage"));
    let dev = device("bat-age");
    let old_key = IdempotencyKey::parse(b"old").unwrap();
    let a = pending("bat-age", 10);
    let a_key = IdempotencyRecord {
        device_id: dev.clone(),
        key: old_key.clone(),
        fingerprint: "minSoc=10".into(),
        request_id: a.request_id.clone(),
        created_at: a.requested_at,
    };
    let anchor = Precondition::Anchor(ledger.anchor(&dev).await.unwrap());
    let etag = ledger
        .accept(
            &a,
            None,
            Some(KeyWrite {
                record: &a_key,
                replaces: None,
            }),
            &anchor,
            &[],
        )
        .await
        .unwrap();
    let later = a.requested_at + IDEMPOTENCY_KEY_RETENTION + chrono::Duration::seconds(1);
    let b = DesiredState::accept(
        dev.clone(),
        MinSoc::new(20).unwrap(),
        later,
        chrono::Duration::days(7),
        Some(&a),
    );
    ledger
        .accept(&b, None, None, &Precondition::Record(etag), &[])
        .await
        .unwrap();
    assert_eq!(ledger.get_idempotency(&dev, &old_key).await.unwrap(), None);
    assert!(
        ledger
            .history_entry(&dev, &a.request_id)
            .await
            .unwrap()
            .is_some(),
        "history stays"
    );
}

#[tokio::test]
async fn pending_lists_every_pending_record_across_1200_devices_following_continuations() {
    let azurite = Azurite::shared();
    let ledger = Arc::new(ledger_on(&azurite, &unique_table("pending")));
    const PENDING: usize = 1200;

    // 1200 pending, 30 applied, and idempotency rows in the same partitions: only the first count.
    let mut writes = Vec::new();
    for i in 0..PENDING {
        writes.push((pending(&format!("dev-{i:05}"), (i % 101) as u8), true));
    }
    for i in 0..30 {
        let mut s = pending(&format!("done-{i:03}"), 50);
        s.mark_applied(t(5));
        writes.push((s, false));
    }
    futures::stream::iter(writes.into_iter().map(|(s, _)| {
        let ledger = ledger.clone();
        async move { ledger.put(&s, None, &[]).await.unwrap() }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    for i in 0..5 {
        // Anchor rows in the same partitions: only the records count.
        ledger
            .anchor(&device(&format!("dev-{i:05}")))
            .await
            .unwrap();
        ledger
            .anchor(&device(&format!("new-{i:05}")))
            .await
            .unwrap();
    }

    let found = ledger.pending().await.unwrap();

    assert!(found.corrupt.is_empty(), "{:?}", found.corrupt);
    let found = found.records;
    assert_eq!(found.len(), PENDING, "a page boundary was not followed");
    let mut ids: Vec<_> = found
        .iter()
        .map(|v| v.value.device_id.as_str().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), PENDING);
    assert!(found
        .iter()
        .all(|v| v.value.status == RequestStatus::Pending));
    let sample = found
        .iter()
        .find(|v| v.value.device_id.as_str() == "dev-00777")
        .unwrap();
    assert_eq!(sample.value.min_soc.percent(), (777 % 101) as u8);

    // The ETag a query returns is usable for a conditional replace, and a stale one is not.
    let mut next = sample.value.clone();
    next.mark_applied(t(9));
    let fresh = ledger.put(&next, Some(&sample.etag), &[]).await.unwrap();
    assert_ne!(fresh, sample.etag);
    assert_eq!(
        ledger.put(&next, Some(&sample.etag), &[]).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(ledger.pending().await.unwrap().records.len(), PENDING - 1);
}

#[tokio::test]
async fn an_unreadable_row_is_reported_as_corrupt_and_does_not_hide_the_rest_of_its_page() {
    let azurite = Azurite::shared();
    let table = unique_table("corrupt");
    let ledger = ledger_on(&azurite, &table);
    for id in ["bat-a", "bat-b", "bat-c"] {
        ledger.put(&pending(id, 30), None, &[]).await.unwrap();
    }
    // A writer with another schema: MinSoc out of range, stored as a number.
    azurite
        .merge_entity(
            &table,
            "bat-b",
            "desired",
            serde_json::json!({ "MinSoc": 250 }),
        )
        .await;

    let page = ledger.pending().await.unwrap();

    let mut read: Vec<_> = page
        .records
        .iter()
        .map(|v| v.value.device_id.as_str())
        .collect();
    read.sort();
    assert_eq!(read, ["bat-a", "bat-c"]);
    assert_eq!(page.corrupt.len(), 1, "{:?}", page.corrupt);
    let corrupt = &page.corrupt[0];
    assert_eq!(
        (corrupt.partition_key.as_str(), corrupt.row_key.as_str()),
        ("bat-b", "desired")
    );
    assert!(corrupt.reason.contains("MinSoc"), "{corrupt}");
    let err = ledger.get(&device("bat-b")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(row) if row.partition_key == "bat-b"),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn two_instances_first_using_the_same_table_at_once_both_succeed() {
    let azurite = Azurite::shared();
    let table = unique_table("race");
    let a = ledger_on(&azurite, &table);
    let b = ledger_on(&azurite, &table);
    let (sa, sb) = (pending("bat-a", 10), pending("bat-b", 20));
    let (ra, rb) = tokio::join!(a.put(&sa, None, &[]), b.put(&sb, None, &[]));
    ra.unwrap();
    rb.unwrap();
    assert!(a.get(&device("bat-b")).await.unwrap().is_some());
}

#[tokio::test]
async fn construction_does_no_io_and_unreachable_storage_is_unavailable_without_secrets() {
    let port = testkit::free_port();
    let key = azurite::ACCOUNT_KEY;
    let conn = StorageConnection::parse(&format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1"
    ))
    .unwrap();
    // Nothing listens there: building must still succeed.
    let ledger = TableLedger::new(&conn, "socsettings").unwrap();

    let err = ledger.get(&device("bat-1")).await.unwrap_err();
    let StoreError::Unavailable(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(reason.contains("could not be reached"), "{reason}");
    assert!(
        !reason.contains(key) && !reason.contains("Eby8"),
        "{reason}"
    );
    // The failed creation is not remembered as done: the next call tries again.
    assert!(matches!(
        ledger.pending().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_wrong_account_key_is_unavailable_not_a_conflict() {
    let azurite = Azurite::shared();
    let conn = StorageConnection::parse(&format!(
        "AccountName=devstoreaccount1;AccountKey=d3Jvbmcta2V5;TableEndpoint={}",
        azurite.table_endpoint()
    ))
    .unwrap();
    let ledger = TableLedger::new(&conn, &unique_table("auth")).unwrap();
    let err = ledger
        .put(&pending("bat-auth", 5), None, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(r) if r.contains("403")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("d3Jvbmcta2V5"));
}

#[test]
fn the_azurite_helper_stops_the_process_and_removes_its_directory_on_drop() {
    let azurite = Azurite::start();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], azurite.port()));
    assert!(std::net::TcpStream::connect(addr).is_ok());
    assert!(azurite.connection_string().contains(&format!(
        "TableEndpoint=http://127.0.0.1:{}/devstoreaccount1",
        azurite.port()
    )));

    drop(azurite);

    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "azurite still listening after drop"
    );
}

#[tokio::test]
async fn the_due_index_lists_a_shards_entries_due_by_then_oldest_first_and_removes_them_by_etag() {
    use soc_settings::domain::due_index::{shard_of, DueEntry};
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("dueindex"));
    // Devices of one shard, and one of another.
    let shard = shard_of(&device("bat-0"));
    let same: Vec<DeviceId> = (0..200)
        .map(|i| device(&format!("bat-{i}")))
        .filter(|d| shard_of(d) == shard)
        .take(3)
        .collect();
    let other = (0..200)
        .map(|i| device(&format!("bat-{i}")))
        .find(|d| shard_of(d) != shard)
        .unwrap();
    let late = DueEntry::new(same[0].clone(), t(300));
    let early = DueEntry::new(same[1].clone(), t(100));
    let middle = DueEntry::new(same[2].clone(), t(200));
    for e in [&late, &early, &middle, &DueEntry::new(other.clone(), t(50))] {
        ledger.file_due(e).await.unwrap();
    }
    // A record in the same table is no index entry.
    ledger.put(&pending("bat-0", 10), None, &[]).await.unwrap();

    let due = ledger.due_entries(shard, t(250), 100).await.unwrap();
    let got: Vec<_> = due.iter().map(|e| e.value.clone()).collect();
    assert_eq!(
        got,
        vec![early.clone(), middle.clone()],
        "due by t(250), oldest first"
    );
    assert_eq!(ledger.due_entries(shard, t(250), 1).await.unwrap().len(), 1);
    assert_eq!(
        ledger.due_entries(shard, t(1000), 100).await.unwrap().len(),
        3
    );

    // Filing the same entry again replaces it: the ETag listed before no longer removes it.
    ledger.file_due(&early).await.unwrap();
    assert_eq!(
        ledger.unfile_due(&early, Some(&due[0].etag)).await,
        Err(StoreError::Conflict)
    );
    let fresh = ledger.due_entries(shard, t(100), 100).await.unwrap();
    ledger
        .unfile_due(&early, Some(&fresh[0].etag))
        .await
        .unwrap();
    ledger
        .unfile_due(&early, Some(&fresh[0].etag))
        .await
        .unwrap(); // already gone: Ok
                   // A writer removes the entry its replaced record named whatever its ETag.
    ledger.file_due(&early).await.unwrap();
    ledger.unfile_due(&early, None).await.unwrap();
    ledger.unfile_due(&early, None).await.unwrap(); // already gone: Ok
    let left: Vec<_> = ledger
        .due_entries(shard, t(1000), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.value)
        .collect();
    assert_eq!(left, vec![middle, late]);
}

#[tokio::test]
async fn a_batch_of_a_hundred_filings_of_one_shard_is_one_transaction_and_a_mixed_one_is_refused() {
    use soc_settings::domain::due_index::{self, shard_of, DueEntry};
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("duebatch"));
    let shard = shard_of(&device("bat-0"));
    let mut batch: Vec<DueEntry> = (0..5000)
        .map(|i| device(&format!("bat-{i}")))
        .filter(|d| shard_of(d) == shard)
        .take(due_index::MAX_BATCH)
        .enumerate()
        .map(|(i, d)| DueEntry::new(d, t(i as i64)).filed(t(0)))
        .collect();
    assert_eq!(batch.len(), due_index::MAX_BATCH);
    ledger.file_due_batch(&batch).await.unwrap();
    let listed = ledger.due_entries(shard, t(1000), 1000).await.unwrap();
    assert_eq!(listed.len(), due_index::MAX_BATCH);
    assert_eq!(listed[0].value.filed_at, Some(t(0)));
    // Filing them again is an upsert: still one row each.
    ledger.file_due_batch(&batch[..10]).await.unwrap();
    assert_eq!(
        ledger
            .due_entries(shard, t(1000), 1000)
            .await
            .unwrap()
            .len(),
        due_index::MAX_BATCH
    );
    // Over the limit, or across shards: refused, nothing written.
    let other = (0..200)
        .map(|i| device(&format!("bat-{i}")))
        .find(|d| shard_of(d) != shard)
        .unwrap();
    let stray = DueEntry::new(other.clone(), t(1));
    batch.truncate(3);
    batch.push(stray);
    assert!(ledger.file_due_batch(&batch).await.is_err());
    assert!(ledger
        .due_entries(shard_of(&other), t(1000), 10)
        .await
        .unwrap()
        .is_empty());
    ledger.file_due_batch(&[]).await.unwrap();
}

#[tokio::test]
async fn the_sweep_state_round_trips_and_is_written_only_over_the_etag_read() {
    use soc_settings::domain::sweep_state::SweepState;
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("sweepstate"));
    assert_eq!(ledger.sweep_state().await.unwrap(), None);
    let mut state = SweepState::default();
    state.take(
        &LeaseHolder::from_stored("sweep-1"),
        t(0),
        chrono::Duration::seconds(279),
    );
    state.reconciled_slice(Some(device("bat-9")), false, t(3));
    let etag = ledger.put_sweep_state(&state, None).await.unwrap();
    assert_eq!(
        ledger.put_sweep_state(&state, None).await,
        Err(StoreError::Conflict),
        "a second run cannot insert over the first"
    );
    let read = ledger.sweep_state().await.unwrap().unwrap();
    assert_eq!(read.value, state);
    assert_eq!(read.etag, etag);
    let mut released = state.clone();
    released.release(&LeaseHolder::from_stored("sweep-1"));
    let newer = ledger
        .put_sweep_state(&released, Some(&etag))
        .await
        .unwrap();
    assert_eq!(
        ledger.put_sweep_state(&state, Some(&etag)).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(ledger.sweep_state().await.unwrap().unwrap().etag, newer);
}

#[tokio::test]
async fn pending_after_resumes_after_a_device_and_says_when_the_listing_ended() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("pendingafter"));
    for i in 0..5 {
        ledger
            .put(&pending(&format!("dev-{i}"), 20), None, &[])
            .await
            .unwrap();
    }
    let mut done = pending("dev-2a", 20);
    done.mark_applied(t(1));
    ledger.put(&done, None, &[]).await.unwrap();

    let (page, next) = ledger.pending_after(None, 2).await.unwrap();
    let ids = |p: &soc_settings::ports::PendingPage| -> Vec<String> {
        p.records
            .iter()
            .map(|r| r.value.device_id.to_string())
            .collect()
    };
    assert_eq!(ids(&page), ["dev-0", "dev-1"]);
    assert_eq!(next, Some(device("dev-1")));
    let (page, next) = ledger.pending_after(next.as_ref(), 2).await.unwrap();
    assert_eq!(
        ids(&page),
        ["dev-2", "dev-3"],
        "the applied dev-2a is not pending"
    );
    let (page, next) = ledger.pending_after(next.as_ref(), 2).await.unwrap();
    assert_eq!(ids(&page), ["dev-4"]);
    assert_eq!(next, None, "the listing ended");
}

fn event(device: &DesiredState, seq: u64, status: &str) -> Notification {
    let mut n = Notification::request_settled(
        &device.device_id,
        &device.request_id,
        soc_settings::domain::history::ShownStatus::Applied,
        seq,
        t(seq as i64),
        &serde_json::json!({"requestId": device.request_id.as_str(), "status": status}),
    );
    n.id = format!("{}.{status}", device.request_id);
    n
}

#[tokio::test]
async fn an_outbox_event_is_stored_only_with_its_write_and_read_back_in_order_until_removed() {
    let azurite = Azurite::shared();
    let ledger = ledger_on(&azurite, &unique_table("outbox"));
    let dev = device("bat-o");
    let a = pending("bat-o", 10);
    let etag = ledger.put(&a, None, &[]).await.unwrap();
    // A write that conflicts stores none of its events.
    let mut applied = a.clone();
    applied.mark_applied(t(5));
    applied.last_event_seq = 1;
    let stale = ETag("W/\"datetime'2000-01-01T00%3A00%3A00Z'\"".into());
    let first = event(&applied, 1, "applied");
    assert_eq!(
        ledger
            .put(&applied, Some(&stale), std::slice::from_ref(&first))
            .await,
        Err(StoreError::Conflict)
    );
    assert!(ledger.outbox(&dev).await.unwrap().is_empty());
    // The write that commits stores them, in the same transaction.
    let etag = ledger
        .put(&applied, Some(&etag), std::slice::from_ref(&first))
        .await
        .unwrap();
    let b = DesiredState::accept(
        dev.clone(),
        MinSoc::new(20).unwrap(),
        t(10),
        chrono::Duration::days(7),
        Some(&applied),
    );
    let (second, third) = (event(&b, 2, "cancelled"), event(&b, 10, "failed"));
    ledger
        .accept(
            &b,
            None,
            None,
            &Precondition::Record(etag),
            &[third.clone(), second.clone()],
        )
        .await
        .unwrap();
    let kept = ledger.outbox(&dev).await.unwrap();
    assert_eq!(
        kept,
        vec![first.clone(), second.clone(), third.clone()],
        "seq order, not write order"
    );
    assert!(ledger
        .outbox(&device("bat-other"))
        .await
        .unwrap()
        .is_empty());
    ledger.remove_outbox(&dev, &[1, 2]).await.unwrap();
    // Removing what is gone already is fine (another dispatcher was first).
    ledger.remove_outbox(&dev, &[1, 2, 10]).await.unwrap();
    assert!(ledger.outbox(&dev).await.unwrap().is_empty());
    assert_eq!(
        ledger.get(&dev).await.unwrap().unwrap().value.request_id,
        b.request_id,
        "the record is untouched"
    );
}
