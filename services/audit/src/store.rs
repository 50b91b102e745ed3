//! The ledger table, its migrations for PostgreSQL and SQLite, and the database refusing any
//! change to a row once written.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use sea_orm_migration::prelude::*;

pub mod ledger_entry {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_entries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub recorded_at: String,
        pub actor: String,
        pub action: String,
        pub resource: String,
        pub outcome: String,
        #[sea_orm(column_type = "Text")]
        pub context: String,
        pub prev_hash: String,
        pub hash: String,
        pub encoding_version: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] DbErr),
}

/// Connects to `database_url` (`postgres://…` or `sqlite://…`) and brings the schema up to date.
pub async fn connect_and_migrate(database_url: &str) -> Result<DatabaseConnection, StoreError> {
    let connection = medai_storage::connect(database_url).await?;
    Migrator::up(&connection, None).await?;
    Ok(connection)
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateLedger)]
    }

    fn migration_table_name() -> DynIden {
        "audit_schema_migrations".into_iden()
    }
}

#[derive(DeriveIden)]
enum LedgerEntries {
    Table,
    Seq,
    RecordedAt,
    Actor,
    Action,
    Resource,
    Outcome,
    Context,
    PrevHash,
    Hash,
    EncodingVersion,
}

struct CreateLedger;

impl MigrationName for CreateLedger {
    fn name(&self) -> &str {
        "m0001_create_ledger"
    }
}

const POSTGRES_APPEND_ONLY: &str = r"
CREATE FUNCTION ledger_entries_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
  FOR EACH ROW EXECUTE FUNCTION ledger_entries_refuse_change();
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
  FOR EACH ROW EXECUTE FUNCTION ledger_entries_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_refuse_change();
";

const SQLITE_APPEND_ONLY: &str = r"
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: UPDATE refused'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: DELETE refused'); END;
";

#[async_trait::async_trait]
impl MigrationTrait for CreateLedger {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LedgerEntries::Table)
                    .col(
                        ColumnDef::new(LedgerEntries::Seq)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::RecordedAt)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(LedgerEntries::Actor).string().not_null())
                    .col(ColumnDef::new(LedgerEntries::Action).string().not_null())
                    .col(ColumnDef::new(LedgerEntries::Resource).string().not_null())
                    .col(ColumnDef::new(LedgerEntries::Outcome).string().not_null())
                    .col(ColumnDef::new(LedgerEntries::Context).text().not_null())
                    .col(
                        ColumnDef::new(LedgerEntries::PrevHash)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::Hash)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerEntries::EncodingVersion)
                            .integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        let triggers = match manager.get_database_backend() {
            sea_orm::DatabaseBackend::Postgres => POSTGRES_APPEND_ONLY,
            _ => SQLITE_APPEND_ONLY,
        };
        manager
            .get_connection()
            .execute_unprepared(triggers)
            .await?;
        Ok(())
    }
}
