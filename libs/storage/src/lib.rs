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
