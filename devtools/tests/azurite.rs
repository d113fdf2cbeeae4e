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
