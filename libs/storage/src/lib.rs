//! One way to open a service's database, whichever backend the URL names. Each service still
//! owns its schema and runs its own migrations on the connection this returns.

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, DbErr,
};

/// Opens `database_url` (`postgres://…`, or `sqlite://…?mode=rwc` for the embedded default).
/// SQLite runs in WAL mode with full sync, so an acknowledged write survives a crash.
pub async fn connect(database_url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(database_url.to_owned());
    // Statement logging could carry request values into logs; the services log what they mean.
    options.sqlx_logging(false).max_connections(8);
    let connection = Database::connect(options).await?;
    if connection.get_database_backend() == DatabaseBackend::Sqlite {
        connection
            .execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .await?;
    }
    Ok(connection)
}

/// Brings a service's schema up to date. Several replicas (or several services on one
/// PostgreSQL cluster, which share its roles) may migrate at the same moment; PostgreSQL then
/// refuses the loser's DDL with a catalogue conflict (`pg_type_typname_nsp_index`,
/// `pg_authid_rolname_index`, "tuple concurrently updated"). Each migration runs in a
/// transaction on PostgreSQL, so the loser changed nothing: it tries again and finds the work
/// done. Any other error is returned at once.
pub async fn migrate<M: sea_orm_migration::MigratorTrait>(
    connection: &DatabaseConnection,
) -> Result<(), DbErr> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match M::up(connection, None).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < ATTEMPTS && is_concurrent_migration_conflict(&error) => {
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Whether `error` is PostgreSQL refusing DDL because another session did the same at once.
fn is_concurrent_migration_conflict(error: &DbErr) -> bool {
    let text = error.to_string();
    text.contains("duplicate key value violates unique constraint \"pg_")
        || text.contains("tuple concurrently updated")
        || text.contains("tuple concurrently deleted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_catalogue_conflicts_count_as_concurrent_migrations() {
        let conflict = DbErr::Custom(
            "duplicate key value violates unique constraint \"pg_type_typname_nsp_index\"".into(),
        );
        assert!(is_concurrent_migration_conflict(&conflict));
        let role = DbErr::Custom("ERROR: tuple concurrently updated".into());
        assert!(is_concurrent_migration_conflict(&role));
        let own_table =
            DbErr::Custom("duplicate key value violates unique constraint \"results_pkey\"".into());
        assert!(!is_concurrent_migration_conflict(&own_table));
        assert!(!is_concurrent_migration_conflict(&DbErr::Custom(
            "syntax error".into()
        )));
    }
}
