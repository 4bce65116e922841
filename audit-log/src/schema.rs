//! What mechwatch creates in a log's database, and the checks that nothing else is there.
//!
//! The schema is an allow-list: every object in `sqlite_master` (table, index, trigger, view)
//! must be one the migrations create, with the same SQL. Anything else was planted: a trigger
//! `AFTER INSERT ON records` runs inside every writer's append (an endless query hangs it, or
//! it copies rows elsewhere), a view or index serves no purpose of ours. A missing guard
//! trigger is not reported here: the triggers are a guard against accidents, and what they
//! guard is checked by the signatures and the chain.
//!
//! Every value in mechwatch's tables has its column's type (SQLite would store text where
//! the signed bytes belong if told to): [`first_mistyped`] finds one that does not, which
//! only someone editing the database makes.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use rusqlite::Connection;

use crate::store::MIGRATIONS;

/// One row of `sqlite_master`: type, name, table and the SQL that created it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Object {
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
}

impl Object {
    fn describe(&self) -> String {
        if self.kind == "table" || self.name == self.table {
            format!("{} {:?}", self.kind, self.name)
        } else {
            format!("{} {:?} on {:?}", self.kind, self.name, self.table)
        }
    }
}

fn objects(conn: &Connection) -> rusqlite::Result<Vec<Object>> {
    let mut stmt = conn.prepare(
        "SELECT CAST(type AS TEXT), CAST(name AS TEXT), CAST(tbl_name AS TEXT), \
         CAST(sql AS TEXT) FROM sqlite_master ORDER BY type, name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Object {
            kind: r.get(0)?,
            name: r.get(1)?,
            table: r.get(2)?,
            sql: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// The objects the migrations create, read from a scratch in-memory database so that the
/// allow-list is the migrations themselves, never a second copy typed by hand.
fn allowed() -> &'static BTreeSet<Object> {
    static ALLOWED: OnceLock<BTreeSet<Object>> = OnceLock::new();
    ALLOWED.get_or_init(|| {
        let scratch = || -> rusqlite::Result<BTreeSet<Object>> {
            let conn = Connection::open_in_memory()?;
            for m in MIGRATIONS {
                conn.execute_batch(m)?;
            }
            Ok(objects(&conn)?.into_iter().collect())
        };
        // The migrations are constant SQL that every build's tests run; an in-memory
        // database cannot fail to apply them short of running out of memory.
        scratch().unwrap_or_default()
    })
}

/// The first object in the database that mechwatch does not create (or whose SQL differs
/// from what it creates), described as `trigger "t" on "records"`.
pub fn first_foreign_object(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let allowed = allowed();
    Ok(objects(conn)?
        .into_iter()
        .find(|o| !allowed.contains(o))
        .map(|o| {
            let known = allowed.iter().any(|a| a.kind == o.kind && a.name == o.name);
            if known {
                format!(
                    "{} whose SQL is not the one mechwatch creates",
                    o.describe()
                )
            } else {
                format!("{}, which mechwatch does not create", o.describe())
            }
        }))
}

/// A value whose type is not its column's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mistyped {
    /// The record's `seq`, for a row of `records`.
    pub seq: Option<u64>,
    /// Where: `records seq 3`, `meta key "log_id"`, `checkpoints size 8`.
    pub place: String,
    pub column: &'static str,
    pub expected: &'static str,
    /// SQLite's `typeof()`: `text`, `blob`, `integer`, `real` or `null`.
    pub found: String,
}

impl std::fmt::Display for Mistyped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: column {} holds a {} value, not {}",
            self.place, self.column, self.found, self.expected
        )
    }
}

/// Each column of mechwatch's tables and the one type its values have.
const COLUMNS: &[(&str, &str, &str)] = &[
    ("records", "bytes", "blob"),
    ("records", "sig", "blob"),
    ("records", "key_id", "text"),
    ("records", "kind", "text"),
    ("records", "subject", "text"),
    ("meta", "key", "text"),
    ("meta", "value", "text"),
    ("checkpoints", "note", "text"),
    ("checkpoints", "written_at", "text"),
];

/// The first value in mechwatch's tables whose type is not its column's. `records.seq` and
/// `checkpoints.size` are `INTEGER PRIMARY KEY`s, which SQLite keeps integer itself.
pub fn first_mistyped(conn: &Connection) -> rusqlite::Result<Option<Mistyped>> {
    for &(table, column, expected) in COLUMNS {
        let key = match table {
            "records" => "seq",
            "checkpoints" => "size",
            _ => "key",
        };
        let query = format!(
            "SELECT CAST({key} AS TEXT), typeof({key}), typeof({column}) FROM {table} \
             WHERE typeof({column}) != '{expected}' ORDER BY {key} LIMIT 1"
        );
        let found = conn
            .prepare(&query)?
            .query_row([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if let Some((id, _, found)) = found {
            let id = id.unwrap_or_else(|| "NULL".into());
            let seq = (table == "records").then(|| id.parse().ok()).flatten();
            let place = match table {
                "meta" => format!("meta key {id:?}"),
                _ => format!("{table} {key} {id}"),
            };
            return Ok(Some(Mistyped {
                seq,
                place,
                column,
                expected,
                found,
            }));
        }
    }
    Ok(None)
}

/// Harden a connection against a planted schema: functions named in views, triggers and
/// defaults may not run unless SQLite marks them innocuous (`trusted_schema = OFF`), and
/// defensive mode refuses `writable_schema` and other ways of corrupting the file by SQL.
pub fn harden(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "trusted_schema", "OFF")?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        for m in MIGRATIONS {
            conn.execute_batch(m).unwrap();
        }
        conn
    }

    #[test]
    fn the_migrations_schema_is_allowed_and_not_empty() {
        assert!(allowed().len() >= 8, "{:?}", allowed());
        assert_eq!(first_foreign_object(&fresh()).unwrap(), None);
    }

    #[test]
    fn a_planted_trigger_view_or_index_is_named() {
        for (sql, name) in [
            (
                "CREATE TRIGGER t_h AFTER INSERT ON records BEGIN SELECT 1; END;",
                "trigger \"t_h\" on \"records\"",
            ),
            ("CREATE VIEW v AS SELECT * FROM records;", "view \"v\""),
            (
                "CREATE INDEX i ON records(kind);",
                "index \"i\" on \"records\"",
            ),
            ("CREATE TABLE loot (x);", "table \"loot\""),
        ] {
            let conn = fresh();
            conn.execute_batch(sql).unwrap();
            let found = first_foreign_object(&conn).unwrap().unwrap();
            assert!(found.contains(name), "{found}");
        }
    }

    #[test]
    fn a_guard_trigger_replaced_by_another_body_is_named() {
        let conn = fresh();
        conn.execute_batch(
            "DROP TRIGGER records_no_update;
             CREATE TRIGGER records_no_update BEFORE UPDATE ON records BEGIN SELECT 1; END;",
        )
        .unwrap();
        let found = first_foreign_object(&conn).unwrap().unwrap();
        assert!(
            found.contains("records_no_update") && found.contains("SQL"),
            "{found}"
        );
        // A dropped guard alone is not foreign.
        let conn = fresh();
        conn.execute_batch("DROP TRIGGER records_no_update;")
            .unwrap();
        assert_eq!(first_foreign_object(&conn).unwrap(), None);
    }

    #[test]
    fn a_value_of_the_wrong_type_is_found_with_its_place() {
        let conn = fresh();
        conn.execute_batch(
            "INSERT INTO records VALUES (0, x'00', x'00', 'k', 'audit', 's');
             INSERT INTO records VALUES (1, 'text', x'00', 'k', 'audit', 's');
             INSERT INTO meta VALUES ('log_id', 'abc');",
        )
        .unwrap();
        let m = first_mistyped(&conn).unwrap().unwrap();
        assert_eq!(m.seq, Some(1));
        assert_eq!(
            m.to_string(),
            "records seq 1: column bytes holds a text value, not blob"
        );
        let conn = fresh();
        conn.execute_batch("INSERT INTO meta VALUES ('log_id', x'01');")
            .unwrap();
        let m = first_mistyped(&conn).unwrap().unwrap();
        assert_eq!(m.seq, None);
        assert!(m.to_string().starts_with("meta key \"log_id\""), "{m}");
    }
}
