//! The one Azurite spawn (`devtools::azurite`) in devhost's shape: tables in a folder that
//! outlives the process. (The in-memory shape is tested through `testkit` in
//! `tests/adapters_table.rs`.) Needs `scripts/setup azurite`.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use devtools::azurite::{self, AzuriteTable, Data};

/// The repository's Azurite (`scripts/setup azurite`), or `$AZURITE_TABLE_BIN`.
fn azurite_bin() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    azurite::binary(repo).unwrap()
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

#[test]
fn azurite_with_a_data_folder_keeps_the_folder_and_its_tables_when_stopped() {
    let bin = azurite_bin();
    let data = std::env::temp_dir().join(format!("devtools-azurite-{}", uuid::Uuid::new_v4()));
    let port = devtools::free_port().unwrap();

    let table = AzuriteTable::start(&bin, port, Data::Folder(data.clone()), None).unwrap();
    assert!(listening(port), "listening once started");
    assert_eq!(
        table.table_endpoint(),
        format!("http://127.0.0.1:{port}/devstoreaccount1")
    );
    drop(table);

    assert!(!listening(port), "still listening after drop");
    let kept: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.iter().any(|f| f.starts_with("__azurite_db_table__")),
        "Azurite's table database is kept in the data folder: {kept:?}"
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn azurite_on_a_port_another_process_holds_fails_with_its_own_output_instead_of_starting() {
    let bin = azurite_bin();
    // Something already listens on the port: Azurite exits with an error.
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();

    let error = AzuriteTable::start(&bin, port, Data::Temporary, None).unwrap_err();

    assert!(error.contains("exited with"), "{error}");
    assert!(error.contains("EADDRINUSE"), "{error}");
}

#[test]
fn the_function_folders_are_the_top_level_folders_holding_a_function_json_sorted() {
    let app = std::env::temp_dir().join(format!("devtools-app-{}", uuid::Uuid::new_v4()));
    for folder in ["Zeta", "Alpha", "NoFunction"] {
        std::fs::create_dir_all(app.join(folder)).unwrap();
    }
    std::fs::write(app.join("Zeta/function.json"), "{}").unwrap();
    std::fs::write(app.join("Alpha/function.json"), "{}").unwrap();
    std::fs::write(app.join("NoFunction/other.json"), "{}").unwrap();
    std::fs::write(app.join("function.json"), "{}").unwrap();

    let folders = devtools::function_folders(&app).unwrap();

    assert_eq!(folders, ["Alpha", "Zeta"]);
    std::fs::remove_dir_all(&app).unwrap();
}

/// A Table REST call to Azurite with the development account's SharedKeyLite signature.
async fn table_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::STANDARD;
    let parsed = url::Url::parse(url).unwrap();
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let key = b64.decode(azurite::ACCOUNT_KEY).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{date}\n/{}{}", azurite::ACCOUNT, parsed.path()).as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    let mut request = http
        .request(method, parsed)
        .header("x-ms-date", &date)
        .header("x-ms-version", "2019-02-02")
        .header("Accept", "application/json;odata=nometadata")
        .header(
            "Authorization",
            format!("SharedKeyLite {}:{signature}", azurite::ACCOUNT),
        );
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_just_before_azurite_is_stopped_is_there_after_a_restart() {
    let bin = azurite_bin();
    let data = std::env::temp_dir().join(format!("devtools-azurite-{}", uuid::Uuid::new_v4()));
    let port = devtools::free_port().unwrap();
    let http = reqwest::Client::new();
    let start = |data: PathBuf| {
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || {
            AzuriteTable::start(&bin, port, Data::Folder(data), None)
        })
    };

    // Arrange: a table and one entity, written an instant before the stop (Azurite's own
    // saves come every 5 s: this write is not in any of them).
    let table = start(data.clone()).await.unwrap().unwrap();
    let endpoint = table.table_endpoint();
    let created = table_call(
        &http,
        reqwest::Method::POST,
        &format!("{endpoint}/Tables"),
        Some(serde_json::json!({"TableName": "kept"})),
    )
    .await;
    assert!(created.status().is_success(), "{}", created.status());
    let inserted = table_call(
        &http,
        reqwest::Method::POST,
        &format!("{endpoint}/kept"),
        Some(serde_json::json!({"PartitionKey": "bat-1", "RowKey": "desired", "MinSoc": 30})),
    )
    .await;
    assert!(inserted.status().is_success(), "{}", inserted.status());

    // Act: stop at once, start again on the same folder.
    tokio::task::spawn_blocking(move || drop(table))
        .await
        .unwrap();
    let table = start(data.clone()).await.unwrap().unwrap();

    // Assert
    let read = table_call(
        &http,
        reqwest::Method::GET,
        &format!("{endpoint}/kept(PartitionKey='bat-1',RowKey='desired')"),
        None,
    )
    .await;
    let status = read.status();
    let body = read.text().await.unwrap();
    assert_eq!(status, 200, "the write was lost by the stop: {body}");
    assert!(body.contains("\"MinSoc\":30"), "{body}");
    tokio::task::spawn_blocking(move || drop(table))
        .await
        .unwrap();
    std::fs::remove_dir_all(&data).unwrap();
}
