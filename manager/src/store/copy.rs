//! `baton db copy`: an installation's database moved from its SQLite file to an
//! empty PostgreSQL database, every table with the same rows, in one
//! transaction (all or nothing).
//!
//! The source is opened (and so migrated) as the manager would open it, so both
//! sides have the schema of this build; a table this build does not know is
//! refused rather than left behind. A target that holds anything (beyond the
//! counters its schema starts with) is refused. Values are converted by the
//! target column's type (SQLite keeps the epoch as an integer in `meta`, where
//! PostgreSQL's store keeps decimal text); ids keep their values, and each
//! identity sequence continues after the highest copied id. The row count of
//! every table is compared after the copy, before the commit.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::types::Value;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, Result, SqliteStore, StoreError};

/// Every table, parents before the tables that refer to them.
const TABLES: &[&str] = &[
    "meta",
    "agents",
    "enrolment_tokens",
    "content",
    "jobs",
    "participants",
    "source_bytes",
    "confirmations",
    "job_warnings",
    "segments",
    "segment_members",
    "leader_history",
    "content_groups",
    "policies",
    "admin_users",
    "api_tokens",
    "web_sessions",
    "audit_log",
    "trust_documents",
    "counters",
    "revocations",
    "agent_versions",
];

/// Columns whose values PostgreSQL generates (identity), copied as they are and then
/// continued after the highest one: (table, column).
const IDENTITIES: &[(&str, &str)] = &[
    ("jobs", "id"),
    ("audit_log", "id"),
    ("job_warnings", "rowid"),
    ("leader_history", "rowid"),
];

/// Copies the SQLite database at `from` into the empty PostgreSQL database of `to`;
/// returns each table and its row count.
pub fn sqlite_to_postgres(from: &Path, to: &PostgresStore) -> Result<Vec<(String, u64)>> {
    if !from.exists() {
        return Err(StoreError::NotFound(format!(
            "SQLite database {}",
            from.display()
        )));
    }
    let source = SqliteStore::open(from)?;
    let src = source.connection();
    let mut known: Vec<String> = src
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    known.retain(|t| !TABLES.contains(&t.as_str()));
    if !known.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "the source has tables this build cannot copy: {}",
            known.join(", ")
        )));
    }
    // One read transaction: every table as of one moment, also beside a writer.
    src.execute_batch("BEGIN")?;
    let copied = copy_in(src, to);
    let _ = src.execute_batch("COMMIT");
    copied
}

/// The copy, inside the source's read transaction.
fn copy_in(src: &rusqlite::Connection, to: &PostgresStore) -> Result<Vec<(String, u64)>> {
    let mut conn = to.conn()?;
    let tx = conn.begin()?;
    for table in TABLES {
        let rows = if *table == "counters" {
            // The schema starts them at 0; anything else is a used database.
            "SELECT count(*) FROM counters WHERE value != 0"
        } else {
            &format!("SELECT count(*) FROM {table}")
        };
        let n: i64 = tx.one(rows, &[])?.try_get(0)?;
        if n > 0 {
            return Err(StoreError::Duplicate(format!(
                "data in the target database (table {table}); copy only into an empty one"
            )));
        }
    }
    tx.batch("DELETE FROM counters")?;
    let mut counts = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let types: BTreeMap<String, String> = tx
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
                &[table],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_>>()?;
        let mut columns: Vec<String> = src
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if types.contains_key("rowid") {
            columns.push("rowid".into());
        }
        let column_types: Vec<&str> = columns
            .iter()
            .map(|c| {
                types.get(c).map(String::as_str).ok_or_else(|| {
                    StoreError::Corrupt(format!("column {table}.{c} is missing in PostgreSQL"))
                })
            })
            .collect::<Result<_>>()?;
        let list = columns.join(", ");
        let insert = format!(
            "INSERT INTO {table} ({list}) VALUES ({})",
            (1..=columns.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let statement = tx.prepare(&insert)?;
        let mut select = src.prepare(&format!("SELECT {list} FROM {table} ORDER BY rowid"))?;
        let mut rows = select.query([])?;
        let mut copied = 0u64;
        while let Some(row) = rows.next()? {
            let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(columns.len());
            for (i, kind) in column_types.iter().enumerate() {
                let value: Value = row.get(i)?;
                values.push(convert(value, kind).map_err(|why| {
                    StoreError::Corrupt(format!("{table}.{}: {why}", columns[i]))
                })?);
            }
            let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_ref()).collect();
            tx.exec(&statement, &params)?;
            copied += 1;
        }
        counts.push((table.to_string(), copied));
    }
    for (table, column) in IDENTITIES {
        tx.exec(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                        coalesce(max({column}), 0) + 1, false) FROM {table}"
            ),
            &[],
        )?;
    }
    for (table, copied) in &counts {
        let source_rows: i64 =
            src.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        let target_rows: i64 = tx
            .one(&format!("SELECT count(*) FROM {table}"), &[])?
            .try_get(0)?;
        if source_rows != target_rows || target_rows as u64 != *copied {
            return Err(StoreError::Corrupt(format!(
                "table {table}: {source_rows} rows in SQLite, {target_rows} in PostgreSQL after the copy"
            )));
        }
    }
    tx.commit()?;
    Ok(counts)
}

/// A SQLite value as a parameter for a PostgreSQL column of type `kind`.
fn convert(value: Value, kind: &str) -> std::result::Result<Box<dyn ToSql + Sync>, String> {
    Ok(match (kind, value) {
        ("bigint", Value::Null) => Box::new(None::<i64>),
        ("bigint", Value::Integer(i)) => Box::new(i),
        ("bytea", Value::Null) => Box::new(None::<Vec<u8>>),
        ("bytea", Value::Blob(b)) => Box::new(b),
        // SQLite's store keeps the epoch as an integer; PostgreSQL's as decimal text.
        ("bytea", Value::Integer(i)) => Box::new(i.to_string().into_bytes()),
        ("bytea", Value::Text(t)) => Box::new(t.into_bytes()),
        ("text", Value::Null) => Box::new(None::<String>),
        ("text", Value::Text(t)) => Box::new(t),
        ("text", Value::Integer(i)) => Box::new(i.to_string()),
        (kind, value) => return Err(format!("{value:?} does not go into a {kind} column")),
    })
}
