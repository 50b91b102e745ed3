//! The auth schema: users, signing keys, refresh tokens, signing tickets and the record of
//! revocations, with migrations for PostgreSQL and SQLite.

use sea_orm::{DatabaseConnection, DbErr};
use sea_orm_migration::prelude::*;

pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(unique)]
        pub username: String,
        /// argon2id PHC string.
        pub password_hash: String,
        pub role: String,
        /// `active` or `disabled`.
        pub status: String,
        pub failed_attempts: i32,
        /// Unix seconds; 0 when not locked.
        pub locked_until: i64,
        pub password_changed_at: i64,
        pub created_at: i64,
        /// Raised whenever every token the user holds must stop working.
        pub token_generation: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod signing_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "signing_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub kid: String,
        pub algorithm: String,
        /// PKCS#8 DER, base64.
        #[sea_orm(column_type = "Text")]
        pub private_key_pkcs8: String,
        /// Raw public key, base64url without padding (the JWK `x`).
        pub public_key: String,
        pub created_at: i64,
        /// Unix seconds from which this key signs; it is published from `created_at`.
        pub activates_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod refresh_token {
    use sea_orm::entity::prelude::*;

    /// One refresh token, stored only as its SHA-256. Tokens rotated from one login share a
    /// family; reuse of a used token revokes the family.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "refresh_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub token_hash: String,
        pub family_id: String,
        pub user_id: String,
        /// The access token issued with this refresh token, revoked with the family.
        pub access_jti: String,
        pub access_expires_at: i64,
        pub expires_at: i64,
        pub used: bool,
        pub revoked: bool,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod signing_ticket {
    use sea_orm::entity::prelude::*;

    /// A single-use ticket for one electronic signature, stored only as its SHA-256.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "signing_tickets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub ticket_hash: String,
        pub user_id: String,
        pub expires_at: i64,
        pub used: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod revoked_token {
    use sea_orm::entity::prelude::*;

    /// A revoked access token, kept until it would have expired anyway. The durable record
    /// that Redis (or the embedded in-process store) is seeded from.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "revoked_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub jti: String,
        pub subject: String,
        pub expires_at: i64,
        pub revoked_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod subject_token_floor {
    use sea_orm::entity::prelude::*;

    /// Every token of `subject` whose generation is below `lowest_valid_generation` is refused
    /// (disable, role change, password change or reset, deletion). Kept without the user row,
    /// so a deleted user's tokens stay refused too.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "subject_token_floors")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub subject: String,
        pub lowest_valid_generation: i64,
        /// Unix seconds until which the floor must be enforced (longer than any token lives).
        pub kept_until: i64,
        pub raised_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub async fn connect_and_migrate(database_url: &str) -> Result<DatabaseConnection, DbErr> {
    connect(database_url, true, medai_storage::DEFAULT_MAX_CONNECTIONS).await
}

/// Connects with a pool of at most `max_connections`; migrates first when `run_migrations`,
/// else refuses a schema that lacks a migration (see `medai_storage::prepare_schema`).
pub async fn connect(
    database_url: &str,
    run_migrations: bool,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let connection =
        medai_storage::connect_with_max_connections(database_url, max_connections).await?;
    medai_storage::prepare_schema::<Migrator>(&connection, run_migrations).await?;
    Ok(connection)
}

/// `medai-auth --migrate`: brings the schema up to date and closes the connection.
pub async fn migrate(database_url: String) -> Result<(), DbErr> {
    connect_and_migrate(&database_url).await?.close().await
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateUsersAndKeys),
            Box::new(AddTokenLifecycle),
            Box::new(AddDurableRevocations),
        ]
    }

    fn migration_table_name() -> DynIden {
        "auth_schema_migrations".into_iden()
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Username,
    PasswordHash,
    Role,
    Status,
    FailedAttempts,
    LockedUntil,
    PasswordChangedAt,
    CreatedAt,
    TokenGeneration,
}

#[derive(DeriveIden)]
enum SigningKeys {
    Table,
    Kid,
    Algorithm,
    PrivateKeyPkcs8,
    PublicKey,
    CreatedAt,
    ActivatesAt,
}

#[derive(DeriveIden)]
enum RefreshTokens {
    Table,
    TokenHash,
    FamilyId,
    UserId,
    AccessJti,
    AccessExpiresAt,
    ExpiresAt,
    Used,
    Revoked,
    CreatedAt,
}

#[derive(DeriveIden)]
enum SigningTickets {
    Table,
    TicketHash,
    UserId,
    ExpiresAt,
    Used,
}

#[derive(DeriveIden)]
enum RevokedTokens {
    Table,
    Jti,
    Subject,
    ExpiresAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum SubjectTokenFloors {
    Table,
    Subject,
    LowestValidGeneration,
    KeptUntil,
    RaisedAt,
}

/// Revocations survive a restart of auth and a Redis that lost its data: they are written to
/// auth's own database in the transaction of the change that causes them.
struct AddDurableRevocations;

impl MigrationName for AddDurableRevocations {
    fn name(&self) -> &str {
        "m0003_add_durable_revocations"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AddDurableRevocations {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RevokedTokens::Table)
                    .col(
                        ColumnDef::new(RevokedTokens::Jti)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RevokedTokens::Subject).string().not_null())
                    .col(
                        ColumnDef::new(RevokedTokens::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RevokedTokens::RevokedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("revoked_tokens_expires_at")
                    .table(RevokedTokens::Table)
                    .col(RevokedTokens::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SubjectTokenFloors::Table)
                    .col(
                        ColumnDef::new(SubjectTokenFloors::Subject)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SubjectTokenFloors::LowestValidGeneration)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SubjectTokenFloors::KeptUntil)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SubjectTokenFloors::RaisedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }
}

struct AddTokenLifecycle;

impl MigrationName for AddTokenLifecycle {
    fn name(&self) -> &str {
        "m0002_add_token_lifecycle"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AddTokenLifecycle {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Users::Table)
                    .add_column(
                        ColumnDef::new(Users::TokenGeneration)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SigningKeys::Table)
                    .add_column(
                        ColumnDef::new(SigningKeys::ActivatesAt)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RefreshTokens::Table)
                    .col(
                        ColumnDef::new(RefreshTokens::TokenHash)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RefreshTokens::FamilyId).string().not_null())
                    .col(ColumnDef::new(RefreshTokens::UserId).string().not_null())
                    .col(ColumnDef::new(RefreshTokens::AccessJti).string().not_null())
                    .col(
                        ColumnDef::new(RefreshTokens::AccessExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(RefreshTokens::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(RefreshTokens::Used).boolean().not_null())
                    .col(ColumnDef::new(RefreshTokens::Revoked).boolean().not_null())
                    .col(
                        ColumnDef::new(RefreshTokens::CreatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("refresh_tokens_family")
                    .table(RefreshTokens::Table)
                    .col(RefreshTokens::FamilyId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SigningTickets::Table)
                    .col(
                        ColumnDef::new(SigningTickets::TicketHash)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SigningTickets::UserId).string().not_null())
                    .col(
                        ColumnDef::new(SigningTickets::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SigningTickets::Used).boolean().not_null())
                    .to_owned(),
            )
            .await
    }
}

struct CreateUsersAndKeys;

impl MigrationName for CreateUsersAndKeys {
    fn name(&self) -> &str {
        "m0001_create_users_and_keys"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateUsersAndKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(ColumnDef::new(Users::Id).string().not_null().primary_key())
                    .col(
                        ColumnDef::new(Users::Username)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(Users::PasswordHash).string().not_null())
                    .col(ColumnDef::new(Users::Role).string().not_null())
                    .col(ColumnDef::new(Users::Status).string().not_null())
                    .col(ColumnDef::new(Users::FailedAttempts).integer().not_null())
                    .col(ColumnDef::new(Users::LockedUntil).big_integer().not_null())
                    .col(
                        ColumnDef::new(Users::PasswordChangedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Users::CreatedAt).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SigningKeys::Table)
                    .col(
                        ColumnDef::new(SigningKeys::Kid)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SigningKeys::Algorithm).string().not_null())
                    .col(
                        ColumnDef::new(SigningKeys::PrivateKeyPkcs8)
                            .text()
                            .not_null(),
                    )
                    .col(ColumnDef::new(SigningKeys::PublicKey).string().not_null())
                    .col(
                        ColumnDef::new(SigningKeys::CreatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }
}
