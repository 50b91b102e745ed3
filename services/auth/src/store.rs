//! The auth schema: users and signing keys, with migrations for PostgreSQL and SQLite.

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
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub async fn connect_and_migrate(database_url: &str) -> Result<DatabaseConnection, DbErr> {
    let connection = medai_storage::connect(database_url).await?;
    Migrator::up(&connection, None).await?;
    Ok(connection)
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateUsersAndKeys)]
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
}

#[derive(DeriveIden)]
enum SigningKeys {
    Table,
    Kid,
    Algorithm,
    PrivateKeyPkcs8,
    PublicKey,
    CreatedAt,
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
