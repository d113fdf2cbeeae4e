//! A lean client of the Azure Table Storage REST API: exactly the operations the ledger
//! ([`super::table_ledger`]) uses, straight over `reqwest`, with as little work per request
//! as the protocol allows (issue 20 item 7: the SDK's request pipeline was about a quarter
//! of the handler's CPU per `POST`).
//!
//! - **Operations**: create the table (an existing one is fine), get an entity with its
//!   ETag, insert (`POST`), replace (`PUT` + `If-Match`), merge (`MERGE` + `If-Match`),
//!   insert-or-replace (`PUT`, no `If-Match`), delete (`If-Match`: an ETag or `*`), a query
//!   page (`$filter`, `$select`, `$top`; paging by the `x-ms-continuation-Next*` headers)
//!   and an entity-group transaction (`$batch`, one changeset; [`BatchOp`]).
//! - **Auth**: the account's shared key ([`TableClient::shared_key`]: the Table service's
//!   `SharedKey` scheme, signed with a pre-keyed HMAC, no string built to sign) or bearer
//!   tokens for `https://storage.azure.com/.default` from the app's credential
//!   ([`TableClient::bearer`]), kept here until [`REFRESH_MARGIN`] before their expiry, so
//!   a request costs no call into the credential.
//! - **Wire format**: JSON with `odata=minimalmetadata` (`odata.etag` on every queried
//!   entity), [`API_VERSION`], OData 3.0 (`DataServiceVersion`, also in each batch part),
//!   `Prefer: return-no-content` on writes (the answer carries
//!   the ETag header only).
//! - **Errors** ([`TableError`]) carry the status and the service's error code, never a URL,
//!   a body, a key, a signature or a token. Retries are the callers' (no retry here); the
//!   timeouts are the transport's ([`super::identity::transport`]).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use azure_core::auth::TokenCredential;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{
    HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_MATCH,
};
use reqwest::{Method, Url};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::identity::REFRESH_MARGIN;

/// A Table entity as JSON properties (`PartitionKey`, `RowKey`, values and their
/// `@odata.type` annotations; what a read returns also has `odata.*` metadata).
pub type Entity = Map<String, Value>;

/// The storage service version every request names (the one `azure_storage` 0.21 sent;
/// bearer tokens on the Table service need 2019-02-02 or later).
pub const API_VERSION: &str = "2022-11-02";

/// The scope of storage data-plane tokens.
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

const JSON: &str = "application/json";
const MINIMAL_METADATA: &str = "application/json;odata=minimalmetadata";
const RETURN_NO_CONTENT: &str = "return-no-content";
const X_MS_DATE: HeaderName = HeaderName::from_static("x-ms-date");
const X_MS_VERSION: HeaderName = HeaderName::from_static("x-ms-version");
/// The OData version every request (and every part of a batch) names: the Table service
/// asks for `DataServiceVersion` or `MaxDataServiceVersion` on its OData operations, and
/// JSON needs 3.0 ("Setting the OData data service version headers").
const ODATA_VERSION: &str = "3.0";
const DATA_SERVICE_VERSION: HeaderName = HeaderName::from_static("dataserviceversion");
const MAX_DATA_SERVICE_VERSION: HeaderName = HeaderName::from_static("maxdataserviceversion");
const PREFER: HeaderName = HeaderName::from_static("prefer");
const NEXT_PARTITION: &str = "x-ms-continuation-nextpartitionkey";
const NEXT_ROW: &str = "x-ms-continuation-nextrowkey";

/// What a query parameter's value keeps unescaped (RFC 3986 unreserved).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a Table operation failed. Its text never holds a secret, a URL or a body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The service answered with this status (and the error code it named, if any).
    #[error("HTTP {status}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { status: u16, code: Option<String> },
    /// No answer: the connection failed, was reset or timed out, or the answer was cut off.
    #[error("storage could not be reached (connection failed or timed out)")]
    Unreachable,
    /// No bearer token from the credential, or one that cannot be a header.
    #[error("storage credentials are invalid or no token from the managed identity endpoint")]
    Credential,
    /// The answer is not what the protocol says (what was wrong, never the content).
    #[error("failed ({0})")]
    Malformed(&'static str),
}

impl TableError {
    /// The service's HTTP status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The `If-Match` condition of a write or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMatch<'a> {
    /// Only over this ETag (as read or written).
    Etag(&'a str),
    /// Whatever the row holds (`*`); the row must exist.
    Any,
}

impl IfMatch<'_> {
    fn value(&self) -> &str {
        match self {
            Self::Etag(etag) => etag,
            Self::Any => "*",
        }
    }
}

/// How [`TableClient::update`] writes over a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// `PUT`: the entity replaces the row (properties it lacks are removed).
    Replace,
    /// `MERGE`: the entity's properties are written into the row, the others kept.
    Merge,
}

/// A query: `$filter`, and optionally `$select` and `$top` (per page).
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub filter: &'a str,
    pub select: Option<&'a str>,
    pub top: Option<u32>,
}

/// Where the next page of a query starts (the `x-ms-continuation-Next*` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub partition_key: String,
    pub row_key: Option<String>,
}

/// One page of a query: its entities (each with its `odata.etag`) and where the next
/// page starts, `None` on the last page.
#[derive(Debug, Default)]
pub struct Page {
    pub entities: Vec<Entity>,
    pub next: Option<Continuation>,
}

/// One operation of an entity-group transaction (all in one partition).
#[derive(Debug, Clone, Copy)]
pub enum BatchOp<'a> {
    /// Insert; fails (409) when the row exists.
    Insert(&'a Entity),
    /// Replace the whole row at the condition.
    Replace {
        row: &'a str,
        entity: &'a Entity,
        if_match: IfMatch<'a>,
    },
    /// Merge these properties into the row at the condition.
    Merge {
        row: &'a str,
        entity: &'a Entity,
        if_match: IfMatch<'a>,
    },
    /// Insert, or replace whatever is there.
    InsertOrReplace { row: &'a str, entity: &'a Entity },
    /// Delete at the condition.
    Delete { row: &'a str, if_match: IfMatch<'a> },
}

/// What a transaction did: all of it, or none of it because of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Committed: each operation's new ETag, in order (`None` for a delete).
    Committed(Vec<Option<String>>),
    /// Nothing was written: the changeset failed at this operation.
    Failed(BatchFailure),
}

/// The operation that failed a changeset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFailure {
    /// Its index in the transaction, when the answer names it (the error
    /// message starts with it: `"N:..."`).
    pub index: Option<usize>,
    pub status: u16,
    pub code: Option<String>,
}

/// The Table service client of one table (module doc).
pub struct TableClient {
    http: reqwest::Client,
    /// The service endpoint (`https://acct.table.core.windows.net/`, or an emulator's
    /// `http://127.0.0.1:10002/devstoreaccount1`).
    endpoint: Url,
    /// `{endpoint}/{table}`: inserts and queries.
    table_url: Url,
    /// `{endpoint}/$batch`: transactions.
    batch_url: Url,
    table: String,
    auth: Auth,
}

enum Auth {
    /// `SharedKey {account}:{signature}`; the HMAC is keyed once and cloned per request.
    SharedKey {
        account: String,
        mac: Hmac<Sha256>,
    },
    Bearer(TokenCache),
}

impl std::fmt::Debug for TableClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("table", &self.table)
            .field(
                "auth",
                &match &self.auth {
                    Auth::SharedKey { account, .. } => format!("shared key of {account}"),
                    Auth::Bearer(_) => "bearer token".to_string(),
                },
            )
            .finish()
    }
}

/// The bearer token header, kept until [`REFRESH_MARGIN`] before the token expires (the
/// credential's own margin, so a token this cache finds stale the credential replaces
/// rather than hands back). One refresh at a time; the others wait for it.
struct TokenCache {
    credential: Arc<dyn TokenCredential>,
    current: Mutex<Option<(HeaderValue, time::OffsetDateTime)>>,
    refresh: tokio::sync::Mutex<()>,
}

impl TokenCache {
    fn fresh(&self) -> Option<HeaderValue> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|(_, expires_on)| {
                *expires_on > time::OffsetDateTime::now_utc() + REFRESH_MARGIN
            })
            .map(|(header, _)| header.clone())
    }

    async fn header(&self) -> Result<HeaderValue, TableError> {
        if let Some(header) = self.fresh() {
            return Ok(header);
        }
        let _one_refresh = self.refresh.lock().await;
        if let Some(header) = self.fresh() {
            return Ok(header);
        }
        // The credential's error may quote the endpoint's answer: only its kind counts.
        let token = self
            .credential
            .get_token(&[STORAGE_SCOPE])
            .await
            .map_err(|_| TableError::Credential)?;
        let mut header = HeaderValue::try_from(format!("Bearer {}", token.token.secret()))
            .map_err(|_| TableError::Credential)?;
        header.set_sensitive(true);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((header.clone(), token.expires_on));
        Ok(header)
    }
}

/// One request before it is signed and sent.
struct Call<'a> {
    method: Method,
    url: Url,
    content_type: Option<HeaderValue>,
    if_match: Option<IfMatch<'a>>,
    /// `Prefer: return-no-content` (writes: the ETag header is all we read).
    no_content: bool,
    body: Vec<u8>,
}

impl TableClient {
    /// A client signing with the account's base64 `key` (`SharedKey`). No I/O.
    pub fn shared_key(
        http: reqwest::Client,
        endpoint: &Url,
        table: &str,
        account: &str,
        key: &str,
    ) -> Result<Self, String> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "the account key is not base64".to_string())?;
        let mac = Hmac::<Sha256>::new_from_slice(&key)
            .map_err(|_| "the account key cannot key an HMAC".to_string())?;
        let auth = Auth::SharedKey {
            account: account.to_string(),
            mac,
        };
        Self::build(http, endpoint, table, auth)
    }

    /// A client sending bearer tokens of `credential` for [`STORAGE_SCOPE`]. No I/O.
    pub fn bearer(
        http: reqwest::Client,
        endpoint: &Url,
        table: &str,
        credential: Arc<dyn TokenCredential>,
    ) -> Result<Self, String> {
        let auth = Auth::Bearer(TokenCache {
            credential,
            current: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        });
        Self::build(http, endpoint, table, auth)
    }

    fn build(
        http: reqwest::Client,
        endpoint: &Url,
        table: &str,
        auth: Auth,
    ) -> Result<Self, String> {
        if endpoint.cannot_be_a_base() {
            return Err("the table endpoint is not a base URL".into());
        }
        let mut endpoint = endpoint.clone();
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        let mut client = Self {
            http,
            table_url: endpoint.clone(),
            batch_url: endpoint.clone(),
            endpoint,
            table: table.to_string(),
            auth,
        };
        client.table_url = client.under_endpoint(table);
        client.batch_url = client.under_endpoint("$batch");
        Ok(client)
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// `{endpoint}/{segment}` (the segment percent-encoded as one path segment).
    fn under_endpoint(&self, segment: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("checked: a base URL")
            .pop_if_empty()
            .push(segment);
        url
    }

    /// `{endpoint}/{table}(PartitionKey='{partition}',RowKey='{row}')`.
    fn entity_url(&self, partition: &str, row: &str) -> Url {
        let mut segment =
            String::with_capacity(self.table.len() + partition.len() + row.len() + 32);
        segment.push_str(&self.table);
        segment.push_str("(PartitionKey='");
        push_key(&mut segment, partition);
        segment.push_str("',RowKey='");
        push_key(&mut segment, row);
        segment.push_str("')");
        self.under_endpoint(&segment)
    }

    /// Creates the table: `Ok(true)` if it was created, `Ok(false)` if it existed (409).
    pub async fn create_table(&self) -> Result<bool, TableError> {
        let body = serde_json::to_vec(&serde_json::json!({ "TableName": self.table }))
            .map_err(|_| TableError::Malformed("table name does not serialise"))?;
        let call = Call {
            method: Method::POST,
            url: self.under_endpoint("Tables"),
            content_type: Some(HeaderValue::from_static(JSON)),
            if_match: None,
            no_content: true,
            body,
        };
        match self.send(call).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entity and its ETag; `None` when there is no such row (404).
    pub async fn get(
        &self,
        partition: &str,
        row: &str,
    ) -> Result<Option<(Entity, String)>, TableError> {
        let call = Call {
            method: Method::GET,
            url: self.entity_url(partition, row),
            content_type: None,
            if_match: None,
            no_content: false,
            body: Vec::new(),
        };
        let response = match self.send(call).await {
            Ok(response) => response,
            Err(e) if e.status() == Some(404) => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = etag_header(&response)?;
        let body = response
            .bytes()
            .await
            .map_err(|_| TableError::Unreachable)?;
        let entity = serde_json::from_slice(&body)
            .map_err(|_| TableError::Malformed("entity is not JSON"))?;
        Ok(Some((entity, etag)))
    }

    /// Inserts the entity (its keys are in it): its ETag; a 409 when the row exists.
    pub async fn insert(&self, entity: &Entity) -> Result<String, TableError> {
        self.write(Method::POST, self.table_url.clone(), entity, None)
            .await
    }

    /// Replaces the row, or merges the properties into it, at the condition: its new
    /// ETag (412: another writer first; 404: the row is gone).
    pub async fn update(
        &self,
        how: Update,
        partition: &str,
        row: &str,
        entity: &Entity,
        if_match: IfMatch<'_>,
    ) -> Result<String, TableError> {
        let method = match how {
            Update::Replace => Method::PUT,
            Update::Merge => merge_method(),
        };
        let url = self.entity_url(partition, row);
        self.write(method, url, entity, Some(if_match)).await
    }

    /// Inserts the row, or replaces whatever is there: its new ETag.
    pub async fn insert_or_replace(
        &self,
        partition: &str,
        row: &str,
        entity: &Entity,
    ) -> Result<String, TableError> {
        let url = self.entity_url(partition, row);
        self.write(Method::PUT, url, entity, None).await
    }

    /// Deletes the row at the condition (404 when it is gone, 412 when it changed).
    pub async fn delete(
        &self,
        partition: &str,
        row: &str,
        if_match: IfMatch<'_>,
    ) -> Result<(), TableError> {
        let call = Call {
            method: Method::DELETE,
            url: self.entity_url(partition, row),
            content_type: None,
            if_match: Some(if_match),
            no_content: false,
            body: Vec::new(),
        };
        self.send(call).await.map(drop)
    }

    /// One page of `query`, from `from` (the previous page's [`Page::next`]) or the start.
    pub async fn query(
        &self,
        query: &Query<'_>,
        from: Option<&Continuation>,
    ) -> Result<Page, TableError> {
        let mut url = self.table_url.clone();
        url.set_query(Some(&query_string(query, from)));
        let call = Call {
            method: Method::GET,
            url,
            content_type: None,
            if_match: None,
            no_content: false,
            body: Vec::new(),
        };
        let response = self.send(call).await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let next = header(NEXT_PARTITION).map(|partition_key| Continuation {
            partition_key,
            row_key: header(NEXT_ROW),
        });
        let body = response
            .bytes()
            .await
            .map_err(|_| TableError::Unreachable)?;
        let entities = parse_query_body(&body)?;
        Ok(Page { entities, next })
    }

    /// One entity-group transaction of `ops` in `partition` (at most 100 operations, one
    /// per row). A failed changeset is `Ok(BatchOutcome::Failed)`; an `Err` is a request
    /// the service did not take as a transaction at all (or did not answer).
    pub async fn batch(
        &self,
        partition: &str,
        ops: &[BatchOp<'_>],
    ) -> Result<BatchOutcome, TableError> {
        let id = uuid::Uuid::new_v4();
        let mut buf = uuid::Uuid::encode_buffer();
        let id = id.hyphenated().encode_lower(&mut buf);
        let body = self.batch_body(id, partition, ops)?;
        let content_type = HeaderValue::try_from(format!("multipart/mixed; boundary=batch_{id}"))
            .map_err(|_| TableError::Malformed("batch boundary"))?;
        let call = Call {
            method: Method::POST,
            url: self.batch_url.clone(),
            content_type: Some(content_type),
            if_match: None,
            no_content: false,
            body,
        };
        let response = self.send(call).await?;
        let body = response
            .bytes()
            .await
            .map_err(|_| TableError::Unreachable)?;
        parse_batch_response(&body)
    }

    /// The multipart body of a transaction: batch `batch_{id}` holding changeset
    /// `changeset_{id}` with one `application/http` part per operation.
    fn batch_body(
        &self,
        id: &str,
        partition: &str,
        ops: &[BatchOp<'_>],
    ) -> Result<Vec<u8>, TableError> {
        use std::io::Write as _;
        let mut body = Vec::with_capacity(512 + ops.len() * 1024);
        let w = |body: &mut Vec<u8>, args: std::fmt::Arguments<'_>| {
            body.write_fmt(args)
                .map_err(|_| TableError::Malformed("batch body"))
        };
        w(
            &mut body,
            format_args!(
                "--batch_{id}\r\nContent-Type: multipart/mixed; boundary=changeset_{id}\r\n\r\n"
            ),
        )?;
        for op in ops {
            let (method, url, entity, if_match) = match *op {
                BatchOp::Insert(entity) => {
                    ("POST", Cow::Borrowed(&self.table_url), Some(entity), None)
                }
                BatchOp::Replace {
                    row,
                    entity,
                    if_match,
                } => (
                    "PUT",
                    Cow::Owned(self.entity_url(partition, row)),
                    Some(entity),
                    Some(if_match),
                ),
                BatchOp::Merge {
                    row,
                    entity,
                    if_match,
                } => (
                    "MERGE",
                    Cow::Owned(self.entity_url(partition, row)),
                    Some(entity),
                    Some(if_match),
                ),
                BatchOp::InsertOrReplace { row, entity } => (
                    "PUT",
                    Cow::Owned(self.entity_url(partition, row)),
                    Some(entity),
                    None,
                ),
                BatchOp::Delete { row, if_match } => (
                    "DELETE",
                    Cow::Owned(self.entity_url(partition, row)),
                    None,
                    Some(if_match),
                ),
            };
            w(&mut body, format_args!(
                "--changeset_{id}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{method} {url} HTTP/1.1\r\nAccept: {MINIMAL_METADATA}\r\nDataServiceVersion: {ODATA_VERSION}\r\n"
            ))?;
            if let Some(if_match) = if_match {
                w(
                    &mut body,
                    format_args!("If-Match: {}\r\n", if_match.value()),
                )?;
            }
            match entity {
                Some(entity) => {
                    w(
                        &mut body,
                        format_args!("Content-Type: {JSON}\r\nPrefer: {RETURN_NO_CONTENT}\r\n\r\n"),
                    )?;
                    serde_json::to_writer(&mut body, entity)
                        .map_err(|_| TableError::Malformed("entity does not serialise"))?;
                    body.extend_from_slice(b"\r\n");
                }
                None => body.extend_from_slice(b"\r\n"),
            }
        }
        w(
            &mut body,
            format_args!("--changeset_{id}--\r\n--batch_{id}--\r\n"),
        )?;
        Ok(body)
    }

    /// A write of the entity as JSON with `Prefer: return-no-content`: the row's new ETag.
    async fn write(
        &self,
        method: Method,
        url: Url,
        entity: &Entity,
        if_match: Option<IfMatch<'_>>,
    ) -> Result<String, TableError> {
        let body = serde_json::to_vec(entity)
            .map_err(|_| TableError::Malformed("entity does not serialise"))?;
        let call = Call {
            method,
            url,
            content_type: Some(HeaderValue::from_static(JSON)),
            if_match,
            no_content: true,
            body,
        };
        etag_header(&self.send(call).await?)
    }

    /// Signs and sends `call`; a non-2xx answer is [`TableError::Status`].
    async fn send(&self, call: Call<'_>) -> Result<reqwest::Response, TableError> {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let authorization = match &self.auth {
            Auth::SharedKey { account, mac } => {
                let content_type = call
                    .content_type
                    .as_ref()
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default();
                shared_key(
                    mac,
                    account,
                    call.method.as_str(),
                    content_type,
                    &date,
                    call.url.path(),
                )
            }
            Auth::Bearer(tokens) => tokens.header().await?,
        };
        let mut request = self
            .http
            .request(call.method, call.url)
            .header(X_MS_DATE, date)
            .header(X_MS_VERSION, HeaderValue::from_static(API_VERSION))
            .header(
                DATA_SERVICE_VERSION,
                HeaderValue::from_static(ODATA_VERSION),
            )
            .header(
                MAX_DATA_SERVICE_VERSION,
                HeaderValue::from_static("3.0;NetFx"),
            )
            .header(ACCEPT, HeaderValue::from_static(MINIMAL_METADATA))
            .header(AUTHORIZATION, authorization);
        if let Some(content_type) = call.content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        if let Some(if_match) = call.if_match {
            let value = HeaderValue::from_str(if_match.value())
                .map_err(|_| TableError::Malformed("ETag is not a header value"))?;
            request = request.header(IF_MATCH, value);
        }
        if call.no_content {
            request = request.header(PREFER, HeaderValue::from_static(RETURN_NO_CONTENT));
        }
        if !call.body.is_empty() {
            request = request.body(call.body);
        }
        let response = request.send().await.map_err(|_| TableError::Unreachable)?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let header_code = response
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let code = match header_code {
            Some(code) => Some(code),
            None => response
                .bytes()
                .await
                .ok()
                .and_then(|body| error_of(&body).0),
        };
        Err(TableError::Status { status, code })
    }
}

/// `MERGE`, the Table service's partial update.
fn merge_method() -> Method {
    Method::from_bytes(b"MERGE").expect("a valid method token")
}

/// A key inside `'...'` of an entity URL: quotes doubled (OData); the path segment's
/// percent-encoding is the URL's.
fn push_key(out: &mut String, key: &str) {
    for c in key.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
}

/// The `Authorization` header of the Table service's `SharedKey` scheme:
/// `HMAC-SHA256(key, VERB \n Content-MD5 \n Content-Type \n Date \n CanonicalizedResource)`
/// in base64, where the date is the `x-ms-date` header's value and the resource is
/// `/{account}{encoded URI path}` (no query: the Table service signs `comp` only, which
/// these operations never use).
pub fn shared_key(
    mac: &Hmac<Sha256>,
    account: &str,
    method: &str,
    content_type: &[u8],
    date: &str,
    path: &str,
) -> HeaderValue {
    let mut mac = mac.clone();
    for part in [
        method.as_bytes(),
        b"\n\n",
        content_type,
        b"\n",
        date.as_bytes(),
        b"\n/",
        account.as_bytes(),
        path.as_bytes(),
    ] {
        mac.update(part);
    }
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut header = HeaderValue::try_from(format!("SharedKey {account}:{signature}"))
        .expect("account names and base64 are header-safe");
    header.set_sensitive(true);
    header
}

/// `$filter=…[&$select=…][&$top=…][&NextPartitionKey=…[&NextRowKey=…]]`, values
/// percent-encoded (a space is `%20`).
fn query_string(query: &Query<'_>, from: Option<&Continuation>) -> String {
    use std::fmt::Write as _;
    let mut q = String::with_capacity(query.filter.len() * 2 + 64);
    let _ = write!(
        q,
        "$filter={}",
        utf8_percent_encode(query.filter, QUERY_VALUE)
    );
    if let Some(select) = query.select {
        let _ = write!(q, "&$select={}", utf8_percent_encode(select, QUERY_VALUE));
    }
    if let Some(top) = query.top {
        let _ = write!(q, "&$top={top}");
    }
    if let Some(from) = from {
        let _ = write!(
            q,
            "&NextPartitionKey={}",
            utf8_percent_encode(&from.partition_key, QUERY_VALUE)
        );
        if let Some(row) = &from.row_key {
            let _ = write!(q, "&NextRowKey={}", utf8_percent_encode(row, QUERY_VALUE));
        }
    }
    q
}

/// The entities of a query answer (`{"value": [...]}`).
fn parse_query_body(body: &[u8]) -> Result<Vec<Entity>, TableError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        value: Vec<Entity>,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.value)
        .map_err(|_| TableError::Malformed("query answer is not JSON"))
}

fn etag_header(response: &reqwest::Response) -> Result<String, TableError> {
    response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or(TableError::Malformed("no ETag in the answer"))
}

/// The error code and message of an error body (`{"odata.error": {"code", "message":
/// {"value"}}}`, or `{"error": ...}`), if it is one.
fn error_of(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let error = value.get("odata.error").or_else(|| value.get("error"));
    let code = error
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(|m| m.get("value").or(Some(m)))
        .and_then(Value::as_str)
        .map(str::to_string);
    (code, message)
}

/// Reads a `$batch` answer: one `HTTP/1.1 {status}` part per operation when the
/// changeset committed, or the failing operation's part (its error message starts with
/// its index, `"N:..."`) when it did not.
pub fn parse_batch_response(body: &[u8]) -> Result<BatchOutcome, TableError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| TableError::Malformed("batch answer is not UTF-8"))?;
    let mut parts = Vec::new();
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .peekable();
    while let Some(line) = lines.next() {
        let Some(status_line) = line.strip_prefix("HTTP/1.1 ") else {
            continue;
        };
        let status: u16 = status_line
            .get(..3)
            .and_then(|s| s.parse().ok())
            .ok_or(TableError::Malformed("batch answer has a bad status line"))?;
        let mut etag = None;
        for header in lines.by_ref() {
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("etag") {
                    etag = Some(value.trim().to_string());
                }
            }
        }
        let mut content = String::new();
        while let Some(line) = lines.peek() {
            if line.starts_with("--") {
                break;
            }
            content.push_str(line);
            lines.next();
        }
        parts.push((status, etag, content));
    }
    if parts.is_empty() {
        return Err(TableError::Malformed(
            "batch answer has no operation response",
        ));
    }
    if let Some((status, _, content)) = parts.iter().find(|(status, ..)| *status >= 300) {
        let (code, message) = error_of(content.as_bytes());
        let index = message
            .as_deref()
            .and_then(|m| m.split_once(':'))
            .and_then(|(n, _)| n.trim().parse().ok());
        return Ok(BatchOutcome::Failed(BatchFailure {
            index,
            status: *status,
            code,
        }));
    }
    Ok(BatchOutcome::Committed(
        parts.into_iter().map(|(_, etag, ..)| etag).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::connection_string::DEV_ACCOUNT_KEY;
    use axum::http::{HeaderMap, StatusCode, Uri};
    use std::time::Duration;

    const DATE: &str = "Sun, 06 Dec 2026 12:00:00 GMT";

    fn http() -> reqwest::Client {
        super::super::identity::transport(Duration::from_secs(2), None).unwrap()
    }

    fn client(endpoint: &str) -> TableClient {
        let endpoint = Url::parse(endpoint).unwrap();
        TableClient::shared_key(
            http(),
            &endpoint,
            "socsettings",
            "devstoreaccount1",
            DEV_ACCOUNT_KEY,
        )
        .unwrap()
    }

    fn mac() -> Hmac<Sha256> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(DEV_ACCOUNT_KEY)
            .unwrap();
        Hmac::new_from_slice(&key).unwrap()
    }

    fn entity(value: Value) -> Entity {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn the_shared_key_is_the_hmac_of_verb_content_type_date_and_the_canonical_resource() {
        // Expected values computed independently (Python's hmac) from the documented
        // string to sign: VERB \n Content-MD5 \n Content-Type \n Date \n /account/path.
        let c = client("http://127.0.0.1:10002/devstoreaccount1");
        let url = c.entity_url("bat-1", "desired");
        assert_eq!(
            url.path(),
            "/devstoreaccount1/socsettings(PartitionKey='bat-1',RowKey='desired')"
        );
        let get = shared_key(&mac(), "devstoreaccount1", "GET", b"", DATE, url.path());
        assert_eq!(
            get.to_str().unwrap(),
            "SharedKey devstoreaccount1:RmNQ98vV8LDceEN2i46oUm5AB463QqQP+k/E7OOsFmA="
        );
        assert!(get.is_sensitive());
        let insert = shared_key(
            &mac(),
            "socstate",
            "POST",
            b"application/json",
            DATE,
            "/socsettings",
        );
        assert_eq!(
            insert.to_str().unwrap(),
            "SharedKey socstate:x3yGAtrSgaF5jwMju40sHbVbHQYvq8gQb3Avz2Vm05k="
        );
    }

    #[test]
    fn entity_urls_double_quotes_in_keys_and_encode_what_a_path_segment_cannot_hold() {
        let c = client("https://socstate.table.core.windows.net/");
        assert_eq!(
            c.entity_url("!due-03", "2027-01-15T08:01:00.123Z~bat-1~0a1b").as_str(),
            "https://socstate.table.core.windows.net/socsettings(PartitionKey='!due-03',RowKey='2027-01-15T08:01:00.123Z~bat-1~0a1b')"
        );
        assert_eq!(
            c.entity_url("o'k", "a b/c#").path(),
            "/socsettings(PartitionKey='o''k',RowKey='a%20b%2Fc%23')"
        );
        assert_eq!(
            c.table_url.as_str(),
            "https://socstate.table.core.windows.net/socsettings"
        );
    }

    #[test]
    fn a_batch_body_is_one_changeset_with_one_http_part_per_operation() {
        let c = client("http://127.0.0.1:10002/devstoreaccount1");
        let desired =
            entity(serde_json::json!({"PartitionKey": "bat-1", "RowKey": "desired", "MinSoc": 30}));
        let anchor = entity(serde_json::json!({"PartitionKey": "bat-1", "RowKey": "anchor"}));
        let ops = [
            BatchOp::Insert(&desired),
            BatchOp::Replace {
                row: "desired",
                entity: &desired,
                if_match: IfMatch::Etag("W/\"1\""),
            },
            BatchOp::Merge {
                row: "anchor",
                entity: &anchor,
                if_match: IfMatch::Any,
            },
            BatchOp::InsertOrReplace {
                row: "req-r1",
                entity: &anchor,
            },
            BatchOp::Delete {
                row: "idem-6b",
                if_match: IfMatch::Etag("W/\"2\""),
            },
        ];
        let body = String::from_utf8(c.batch_body("B", "bat-1", &ops).unwrap()).unwrap();
        let base = "http://127.0.0.1:10002/devstoreaccount1/socsettings";
        let part = "--changeset_B\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n";
        let accept =
            "Accept: application/json;odata=minimalmetadata\r\nDataServiceVersion: 3.0\r\n";
        let json = "Content-Type: application/json\r\nPrefer: return-no-content\r\n\r\n";
        let expected = [
            "--batch_B\r\nContent-Type: multipart/mixed; boundary=changeset_B\r\n\r\n".to_string(),
            format!("{part}POST {base} HTTP/1.1\r\n{accept}{json}{{\"MinSoc\":30,\"PartitionKey\":\"bat-1\",\"RowKey\":\"desired\"}}\r\n"),
            format!("{part}PUT {base}(PartitionKey='bat-1',RowKey='desired') HTTP/1.1\r\n{accept}If-Match: W/\"1\"\r\n{json}{{\"MinSoc\":30,\"PartitionKey\":\"bat-1\",\"RowKey\":\"desired\"}}\r\n"),
            format!("{part}MERGE {base}(PartitionKey='bat-1',RowKey='anchor') HTTP/1.1\r\n{accept}If-Match: *\r\n{json}{{\"PartitionKey\":\"bat-1\",\"RowKey\":\"anchor\"}}\r\n"),
            format!("{part}PUT {base}(PartitionKey='bat-1',RowKey='req-r1') HTTP/1.1\r\n{accept}{json}{{\"PartitionKey\":\"bat-1\",\"RowKey\":\"anchor\"}}\r\n"),
            format!("{part}DELETE {base}(PartitionKey='bat-1',RowKey='idem-6b') HTTP/1.1\r\n{accept}If-Match: W/\"2\"\r\n\r\n"),
            "--changeset_B--\r\n--batch_B--\r\n".to_string(),
        ]
        .concat();
        assert_eq!(body, expected);
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/table-batch")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_committed_batch_gives_each_operations_etag_in_order() {
        assert_eq!(
            parse_batch_response(&fixture("committed.http")),
            Ok(BatchOutcome::Committed(vec![
                Some("W/\"datetime'2026-12-06T12%3A11%3A30.6906804Z'\"".into()),
                Some("W/\"datetime'2026-12-06T12%3A11%3A30.6906812Z'\"".into()),
            ]))
        );
        assert_eq!(
            parse_batch_response(&fixture("deletes-committed.http")),
            Ok(BatchOutcome::Committed(vec![None, None]))
        );
    }

    #[test]
    fn a_failed_batch_names_the_failing_operation_its_status_and_code() {
        let failed = |index, status, code: &str| {
            Ok(BatchOutcome::Failed(BatchFailure {
                index: Some(index),
                status,
                code: Some(code.into()),
            }))
        };
        assert_eq!(
            parse_batch_response(&fixture("conflict-409-at-1.http")),
            failed(1, 409, "EntityAlreadyExists")
        );
        assert_eq!(
            parse_batch_response(&fixture("precondition-412-at-0.http")),
            failed(0, 412, "UpdateConditionNotSatisfied")
        );
        assert_eq!(
            parse_batch_response(&fixture("not-found-404-at-2.http")),
            failed(2, 404, "ResourceNotFound")
        );
    }

    #[test]
    fn a_batch_answer_without_operation_parts_is_malformed_not_a_commit() {
        for body in [
            &b""[..],
            b"--batchresponse_x\r\n--batchresponse_x--\r\n",
            b"HTTP/1.1 2",
        ] {
            assert!(
                matches!(parse_batch_response(body), Err(TableError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// What a loopback stand-in of the Table service saw: method, path and query, headers.
    type Seen = Arc<Mutex<Vec<(String, String, HeaderMap)>>>;

    /// A canned answer: status, headers, body.
    type Answer = (u16, Vec<(&'static str, &'static str)>, &'static str);

    /// A stand-in answering each request with the next of `answers` (status, headers, body).
    async fn stand_in(answers: Vec<Answer>) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        let log = seen.clone();
        let app =
            axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
                let (log, answers) = (log.clone(), answers.clone());
                async move {
                    log.lock()
                        .unwrap()
                        .push((method.to_string(), uri.to_string(), headers));
                    let (status, headers, body) =
                        answers.lock().unwrap().next().expect("an answer left");
                    let mut response = axum::response::Response::new(axum::body::Body::from(body));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (name, value) in headers {
                        response
                            .headers_mut()
                            .insert(name, HeaderValue::from_static(value));
                    }
                    response
                }
            });
        let addr = crate::adapters::serve_on_loopback(app).await;
        (format!("http://{addr}/devstoreaccount1"), seen)
    }

    #[tokio::test]
    async fn a_query_follows_the_continuation_headers_page_by_page() {
        let page = r#"{"odata.metadata":"m","value":[{"PartitionKey":"a","RowKey":"desired","odata.etag":"W/\"e1\""}]}"#;
        let last = r#"{"odata.metadata":"m","value":[{"PartitionKey":"b c","RowKey":"desired","odata.etag":"W/\"e2\""}]}"#;
        let (endpoint, seen) = stand_in(vec![
            (
                200,
                vec![
                    ("x-ms-continuation-NextPartitionKey", "1!8!YiBj"),
                    ("x-ms-continuation-NextRowKey", "1!12!ZGVzaXJlZA--"),
                ],
                page,
            ),
            (200, vec![], last),
        ])
        .await;
        let c = client(&endpoint);
        let query = Query {
            filter: "RowKey eq 'desired' and Status eq 'pending'",
            select: Some("RowKey,FiledAt"),
            top: Some(1000),
        };

        let first = c.query(&query, None).await.unwrap();
        let next = first.next.clone().expect("a continuation");
        let second = c.query(&query, Some(&next)).await.unwrap();

        assert_eq!(
            next,
            Continuation {
                partition_key: "1!8!YiBj".into(),
                row_key: Some("1!12!ZGVzaXJlZA--".into())
            }
        );
        assert_eq!(second.next, None);
        assert_eq!(first.entities[0]["odata.etag"], "W/\"e1\"");
        assert_eq!(second.entities[0]["PartitionKey"], "b c");
        let seen = seen.lock().unwrap();
        let filter = "$filter=RowKey%20eq%20%27desired%27%20and%20Status%20eq%20%27pending%27&$select=RowKey%2CFiledAt&$top=1000";
        assert_eq!(seen[0].1, format!("/devstoreaccount1/socsettings?{filter}"));
        assert_eq!(
            seen[1].1,
            format!("/devstoreaccount1/socsettings?{filter}&NextPartitionKey=1%218%21YiBj&NextRowKey=1%2112%21ZGVzaXJlZA--")
        );
        for (_, _, headers) in seen.iter() {
            assert_eq!(headers["x-ms-version"], API_VERSION);
            assert_eq!(headers["accept"], MINIMAL_METADATA);
            assert!(headers["authorization"]
                .to_str()
                .unwrap()
                .starts_with("SharedKey devstoreaccount1:"));
            assert!(headers["x-ms-date"].to_str().unwrap().ends_with(" GMT"));
        }
    }

    #[tokio::test]
    async fn a_read_gives_the_etag_header_none_for_404_and_errors_carry_status_and_code_only() {
        let (endpoint, seen) = stand_in(vec![
            (200, vec![("etag", "W/\"datetime'2026-12-06T12%3A00%3A00Z'\"")], r#"{"PartitionKey":"bat-1","RowKey":"desired","MinSoc":30}"#),
            (404, vec![], r#"{"odata.error":{"code":"ResourceNotFound","message":{"value":"gone"}}}"#),
            (403, vec![], r#"{"odata.error":{"code":"AuthenticationFailed","message":{"value":"Server failed to authenticate the request. sig=abc"}}}"#),
            (503, vec![("x-ms-error-code", "ServerBusy")], "busy"),
        ])
        .await;
        let c = client(&endpoint);

        let (found, etag) = c.get("bat-1", "desired").await.unwrap().unwrap();
        assert_eq!(etag, "W/\"datetime'2026-12-06T12%3A00%3A00Z'\"");
        assert_eq!(found["MinSoc"], 30);
        assert_eq!(c.get("bat-1", "desired").await, Ok(None));
        let denied = c.get("bat-1", "desired").await.unwrap_err();
        assert_eq!(
            denied,
            TableError::Status {
                status: 403,
                code: Some("AuthenticationFailed".into())
            }
        );
        assert_eq!(denied.to_string(), "HTTP 403 (AuthenticationFailed)");
        let busy = c
            .delete("bat-1", "desired", IfMatch::Any)
            .await
            .unwrap_err();
        assert_eq!(busy.to_string(), "HTTP 503 (ServerBusy)");
        assert_eq!(seen.lock().unwrap()[3].2["if-match"], "*");
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable_and_no_error_or_debug_text_holds_the_key() {
        let port = testkit_free_port();
        let c = client(&format!("http://127.0.0.1:{port}/devstoreaccount1"));
        let err = c.get("bat-1", "desired").await.unwrap_err();
        assert_eq!(err, TableError::Unreachable);
        for text in [err.to_string(), format!("{c:?}")] {
            assert!(
                !text.contains(DEV_ACCOUNT_KEY) && !text.contains("Eby8"),
                "{text}"
            );
        }
    }

    /// A port nothing listens on (bound, then released).
    fn testkit_free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Hands out `tok-{n}` tokens valid for `lifetime`, counting the calls.
    #[derive(Debug)]
    struct CountingCredential {
        calls: std::sync::atomic::AtomicUsize,
        lifetime: time::Duration,
        scopes: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl TokenCredential for CountingCredential {
        async fn get_token(
            &self,
            scopes: &[&str],
        ) -> azure_core::Result<azure_core::auth::AccessToken> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            self.scopes
                .lock()
                .unwrap()
                .extend(scopes.iter().map(|s| s.to_string()));
            Ok(azure_core::auth::AccessToken::new(
                azure_core::auth::Secret::new(format!("tok-{n}")),
                time::OffsetDateTime::now_utc() + self.lifetime,
            ))
        }

        async fn clear_cache(&self) -> azure_core::Result<()> {
            Ok(())
        }
    }

    fn tokens(lifetime: time::Duration) -> (TokenCache, Arc<CountingCredential>) {
        let credential = Arc::new(CountingCredential {
            calls: Default::default(),
            lifetime,
            scopes: Mutex::default(),
        });
        let cache = TokenCache {
            credential: credential.clone(),
            current: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        };
        (cache, credential)
    }

    #[tokio::test]
    async fn a_bearer_token_is_asked_for_once_and_reused_until_shortly_before_it_expires() {
        let (cache, credential) = tokens(time::Duration::hours(1));
        for _ in 0..3 {
            let header = cache.header().await.unwrap();
            assert_eq!(header.to_str().unwrap(), "Bearer tok-1");
            assert!(header.is_sensitive());
        }
        assert_eq!(
            credential.calls.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert_eq!(*credential.scopes.lock().unwrap(), [STORAGE_SCOPE]);

        // A token with less than the refresh margin left is replaced before it is used.
        let (cache, credential) = tokens(time::Duration::seconds(10));
        assert_eq!(
            cache.header().await.unwrap().to_str().unwrap(),
            "Bearer tok-1"
        );
        assert_eq!(
            cache.header().await.unwrap().to_str().unwrap(),
            "Bearer tok-2"
        );
        assert_eq!(
            credential.calls.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }

    #[tokio::test]
    async fn a_bearer_client_sends_the_token_and_the_service_version_tokens_need() {
        let (endpoint, seen) = stand_in(vec![(204, vec![], ""), (409, vec![], "")]).await;
        let (cache, _) = tokens(time::Duration::hours(1));
        let c = TableClient::bearer(
            http(),
            &Url::parse(&endpoint).unwrap(),
            "socsettings",
            cache.credential.clone(),
        )
        .unwrap();

        assert_eq!(c.create_table().await, Ok(true));
        assert_eq!(c.create_table().await, Ok(false), "409: it exists");

        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "POST");
        assert_eq!(seen[0].1, "/devstoreaccount1/Tables");
        assert_eq!(seen[0].2["authorization"], "Bearer tok-1");
        assert!(
            API_VERSION >= "2019-02-02",
            "bearer tokens on tables need 2019-02-02 or later"
        );
        assert_eq!(seen[0].2["x-ms-version"], API_VERSION);
    }
}
