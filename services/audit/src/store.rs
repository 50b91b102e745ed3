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

pub mod ledger_checkpoint {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tree_size: i64,
        pub head_hash: String,
        pub merkle_root: String,
        pub created_at: String,
        pub key_id: String,
        pub signature: String,
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
    medai_storage::migrate::<Migrator>(&connection).await?;
    Ok(connection)
}

/// Connects; migrates first when `run_migrations`, else refuses a schema that lacks a
/// migration (see `medai_storage::prepare_schema`).
pub async fn connect(
    database_url: &str,
    run_migrations: bool,
) -> Result<DatabaseConnection, StoreError> {
    let connection = medai_storage::connect(database_url).await?;
    medai_storage::prepare_schema::<Migrator>(&connection, run_migrations).await?;
    Ok(connection)
}

/// `medai-audit --migrate`: brings the schema up to date as the schema owner (the migration
/// Job's role) and closes the connection.
pub async fn migrate(owner_url: String) -> Result<(), StoreError> {
    Ok(connect_and_migrate(&owner_url).await?.close().await?)
}

/// Migrates as the schema owner, then connects as the service's own, narrower role.
pub async fn migrate_then_connect(
    owner_url: &str,
    service_url: &str,
) -> Result<DatabaseConnection, StoreError> {
    let owner = medai_storage::connect(owner_url).await?;
    medai_storage::migrate::<Migrator>(&owner).await?;
    owner.close().await?;
    Ok(medai_storage::connect(service_url).await?)
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateLedger),
            Box::new(AddCheckpointsAndGrants),
            Box::new(NameTheTableInRefusals),
            Box::new(LetTheWriterReadSchemaVersions),
        ]
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

#[derive(DeriveIden)]
enum LedgerCheckpoints {
    Table,
    TreeSize,
    HeadHash,
    MerkleRoot,
    CreatedAt,
    KeyId,
    Signature,
}

struct AddCheckpointsAndGrants;

impl MigrationName for AddCheckpointsAndGrants {
    fn name(&self) -> &str {
        "m0002_add_checkpoints_and_grants"
    }
}

/// The role the audit service's login role belongs to in production: it may read and append,
/// nothing else. Creating it needs CREATEROLE; where the migration lacks it, a DBA creates it.
const POSTGRES_GRANTS: &str = r"
CREATE TRIGGER ledger_checkpoints_no_update BEFORE UPDATE ON ledger_checkpoints
  FOR EACH ROW EXECUTE FUNCTION ledger_entries_refuse_change();
CREATE TRIGGER ledger_checkpoints_no_delete BEFORE DELETE ON ledger_checkpoints
  FOR EACH ROW EXECUTE FUNCTION ledger_entries_refuse_change();
CREATE TRIGGER ledger_checkpoints_no_truncate BEFORE TRUNCATE ON ledger_checkpoints
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_refuse_change();
REVOKE ALL ON ledger_entries, ledger_checkpoints FROM PUBLIC;
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medai_ledger_writer') THEN
    BEGIN
      CREATE ROLE medai_ledger_writer NOLOGIN;
    EXCEPTION WHEN insufficient_privilege OR duplicate_object OR unique_violation THEN
      RAISE NOTICE 'cannot create role medai_ledger_writer; create it and grant it SELECT, INSERT';
    END;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medai_ledger_writer') THEN
    GRANT SELECT, INSERT ON ledger_entries, ledger_checkpoints TO medai_ledger_writer;
  END IF;
END
$$;
";

const SQLITE_CHECKPOINTS_APPEND_ONLY: &str = r"
CREATE TRIGGER ledger_checkpoints_no_update BEFORE UPDATE ON ledger_checkpoints
BEGIN SELECT RAISE(ABORT, 'ledger_checkpoints is append-only: UPDATE refused'); END;
CREATE TRIGGER ledger_checkpoints_no_delete BEFORE DELETE ON ledger_checkpoints
BEGIN SELECT RAISE(ABORT, 'ledger_checkpoints is append-only: DELETE refused'); END;
";

#[async_trait::async_trait]
impl MigrationTrait for AddCheckpointsAndGrants {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LedgerCheckpoints::Table)
                    .col(
                        ColumnDef::new(LedgerCheckpoints::TreeSize)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(LedgerCheckpoints::HeadHash)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerCheckpoints::MerkleRoot)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(LedgerCheckpoints::CreatedAt)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(LedgerCheckpoints::KeyId).string().not_null())
                    .col(
                        ColumnDef::new(LedgerCheckpoints::Signature)
                            .text()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        let statements = match manager.get_database_backend() {
            sea_orm::DatabaseBackend::Postgres => POSTGRES_GRANTS,
            _ => SQLITE_CHECKPOINTS_APPEND_ONLY,
        };
        manager
            .get_connection()
            .execute_unprepared(statements)
            .await?;
        Ok(())
    }
}

struct NameTheTableInRefusals;

impl MigrationName for NameTheTableInRefusals {
    fn name(&self) -> &str {
        "m0003_name_the_table_in_refusals"
    }
}

/// One refusal function serves both tables; it now names the table it refused a change to, so
/// an attempt on a checkpoint row says `ledger_checkpoints`.
const POSTGRES_REFUSAL_NAMES_TABLE: &str = r"
CREATE OR REPLACE FUNCTION ledger_entries_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
";

#[async_trait::async_trait]
impl MigrationTrait for NameTheTableInRefusals {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite's triggers name their table already.
        if manager.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(POSTGRES_REFUSAL_NAMES_TABLE)
                .await?;
        }
        Ok(())
    }
}

struct LetTheWriterReadSchemaVersions;

impl MigrationName for LetTheWriterReadSchemaVersions {
    fn name(&self) -> &str {
        "m0004_let_the_writer_read_schema_versions"
    }
}

/// A replica started with migrations off (the chart: its migration Job ran them as the schema
/// owner) checks that every migration is recorded before it serves, as the narrow
/// `medai_ledger_writer` role; that role may read the record of versions, never change it.
const POSTGRES_WRITER_READS_VERSIONS: &str = r"
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medai_ledger_writer') THEN
    GRANT SELECT ON audit_schema_migrations TO medai_ledger_writer;
  END IF;
END
$$;
";

#[async_trait::async_trait]
impl MigrationTrait for LetTheWriterReadSchemaVersions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(POSTGRES_WRITER_READS_VERSIONS)
                .await?;
        }
        Ok(())
    }
}
