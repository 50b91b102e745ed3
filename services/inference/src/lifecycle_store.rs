//! The lifecycle store: which version of each model is staged, active or retired, and the
//! activation history, kept in the inference service's database (beside the results) so every
//! replica agrees on it and the model repository stays immutable (a read-only mount).
//!
//! One row per model. `revision` grows by one with every change; it is what replicas poll to
//! notice a change, and what a change names as the state it was planned from (optimistic
//! concurrency): a change planned from a revision that is no longer current, or made while
//! another replica's change to the same model is in flight, is refused as a conflict.
//!
//! A change is made in one transaction: the row is locked (PostgreSQL: `FOR UPDATE NOWAIT`,
//! so a change already in flight elsewhere is a conflict at once rather than a wait) and
//! written, the ledger records the change while the lock is held, and only then is the
//! transaction committed. A change the ledger did not record is rolled back: no replica ever
//! sees it.
//!
//! Seeding: the first time a model is seen (no row for it), the statuses in its manifests and
//! its `activation-history` file become its row. From then on the store is the record: the
//! manifests' `status` lines are never read again for that model, and a version folder added
//! later enters only through StageModelVersion.

use std::collections::{BTreeMap, HashMap};

use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, QueryFilter, QuerySelect, SqlErr, TransactionTrait,
};

use crate::manifest::ModelStatus;
use crate::rollout::Rollout;

pub mod lifecycle_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "model_lifecycle")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub model_name: String,
        /// One more with every change; 1 when seeded.
        pub revision: i64,
        /// `{"<version>": "staged" | "active" | "retired", …}`.
        #[sea_orm(column_type = "Text")]
        pub versions_json: String,
        /// Versions activated, oldest first; a rollback returns to the one before the last.
        #[sea_orm(column_type = "Text")]
        pub history_json: String,
        /// The ledger entry that recorded the last change; 0 for a seeded row.
        pub ledger_seq: i64,
        /// Unix microseconds, UTC.
        pub updated_at: i64,
        /// The canary and shadow roles (issue 18): `{"canary": {"version": …,
        /// "share_percent": …}, "shadow": …}`, `{}` when none (m0004).
        #[sea_orm(column_type = "Text")]
        pub rollout_json: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What the store holds for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleState {
    pub revision: i64,
    pub versions: BTreeMap<String, ModelStatus>,
    pub history: Vec<String>,
    pub rollout: Rollout,
}

impl LifecycleState {
    /// The active version, if any.
    pub fn active(&self) -> Option<&str> {
        self.versions
            .iter()
            .find(|(_, status)| **status == ModelStatus::Active)
            .map(|(version, _)| version.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleStoreError {
    /// Another change to the model was made since this one was planned, or is being made now.
    #[error("model {name} was changed concurrently")]
    Conflict { name: String },
    #[error("lifecycle store: {0}")]
    Database(#[from] DbErr),
    #[error("lifecycle row of {name} is unreadable: {reason}")]
    Corrupt { name: String, reason: String },
}

#[derive(Clone)]
pub struct LifecycleStore {
    connection: DatabaseConnection,
}

/// A change written in an open transaction, locked against every other writer; committed
/// once the ledger has recorded it, else rolled back.
pub struct PendingChange {
    transaction: DatabaseTransaction,
    name: String,
    pub revision: i64,
}

impl LifecycleStore {
    /// The store on a connection whose schema [`crate::results::Migrator`] brought up to date.
    pub fn new(connection: DatabaseConnection) -> Self {
        Self { connection }
    }

    /// Writes `state` as the model's row unless the model has one; true if it was written.
    /// Replicas seeding at the same moment are safe: one insert wins, the others find a row.
    pub async fn seed(
        &self,
        name: &str,
        versions: &BTreeMap<String, ModelStatus>,
        history: &[String],
    ) -> Result<bool, LifecycleStoreError> {
        let row = lifecycle_row::ActiveModel {
            model_name: ActiveValue::Set(name.to_owned()),
            revision: ActiveValue::Set(1),
            versions_json: ActiveValue::Set(encode(versions)),
            history_json: ActiveValue::Set(encode(history)),
            ledger_seq: ActiveValue::Set(0),
            updated_at: ActiveValue::Set(crate::results::now_micros()),
            rollout_json: ActiveValue::Set(encode(&Rollout::default())),
        };
        match lifecycle_row::Entity::insert(row)
            .exec(&self.connection)
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if is_duplicate(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// The model's state, if it has a row.
    pub async fn load(&self, name: &str) -> Result<Option<LifecycleState>, LifecycleStoreError> {
        lifecycle_row::Entity::find_by_id(name.to_owned())
            .one(&self.connection)
            .await?
            .map(decode_row)
            .transpose()
    }

    /// Every model's revision: what a replica polls to notice changes made elsewhere.
    pub async fn revisions(&self) -> Result<HashMap<String, i64>, LifecycleStoreError> {
        use lifecycle_row::Column;
        let rows: Vec<(String, i64)> = lifecycle_row::Entity::find()
            .select_only()
            .column(Column::ModelName)
            .column(Column::Revision)
            .into_tuple()
            .all(&self.connection)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Locks the model's row and writes the new state over `base_revision` (0: the model has
    /// no row yet), inside a transaction left open for the ledger. A row at another revision,
    /// locked by another writer, or created meanwhile is a [`LifecycleStoreError::Conflict`].
    pub async fn begin_change(
        &self,
        name: &str,
        base_revision: i64,
        versions: &BTreeMap<String, ModelStatus>,
        history: &[String],
        rollout: &Rollout,
    ) -> Result<PendingChange, LifecycleStoreError> {
        use lifecycle_row::Column;
        let conflict = || LifecycleStoreError::Conflict {
            name: name.to_owned(),
        };
        let transaction = self.connection.begin().await?;
        let now = crate::results::now_micros();
        if base_revision == 0 {
            let row = lifecycle_row::ActiveModel {
                model_name: ActiveValue::Set(name.to_owned()),
                revision: ActiveValue::Set(1),
                versions_json: ActiveValue::Set(encode(versions)),
                history_json: ActiveValue::Set(encode(history)),
                ledger_seq: ActiveValue::Set(0),
                updated_at: ActiveValue::Set(now),
                rollout_json: ActiveValue::Set(encode(rollout)),
            };
            return match lifecycle_row::Entity::insert(row).exec(&transaction).await {
                Ok(_) => Ok(PendingChange {
                    transaction,
                    name: name.to_owned(),
                    revision: 1,
                }),
                Err(error) if is_duplicate(&error) || is_lock_refused(&error) => Err(conflict()),
                Err(error) => Err(error.into()),
            };
        }
        if transaction.get_database_backend() == DatabaseBackend::Postgres {
            // Fail at once if another replica's change holds the row (its ledger call may
            // take a while); the caller retries on fresh state.
            let locked = lifecycle_row::Entity::find_by_id(name.to_owned())
                .lock_with_behavior(LockType::Update, LockBehavior::Nowait)
                .one(&transaction)
                .await;
            match locked {
                Ok(Some(row)) if row.revision == base_revision => {}
                Ok(_) => {
                    transaction.rollback().await?;
                    return Err(conflict());
                }
                Err(error) if is_lock_refused(&error) => return Err(conflict()),
                Err(error) => return Err(error.into()),
            }
        }
        let updated = lifecycle_row::Entity::update_many()
            .col_expr(Column::Revision, Expr::value(base_revision + 1))
            .col_expr(Column::VersionsJson, Expr::value(encode(versions)))
            .col_expr(Column::HistoryJson, Expr::value(encode(history)))
            .col_expr(Column::RolloutJson, Expr::value(encode(rollout)))
            .col_expr(Column::UpdatedAt, Expr::value(now))
            .filter(Column::ModelName.eq(name))
            .filter(Column::Revision.eq(base_revision))
            .exec(&transaction)
            .await;
        match updated {
            Ok(result) if result.rows_affected == 1 => Ok(PendingChange {
                transaction,
                name: name.to_owned(),
                revision: base_revision + 1,
            }),
            // Rolled back now, not when the dropped transaction gets round to it: on SQLite
            // the refused UPDATE holds the write lock, and the caller's retry would find it.
            Ok(_) => {
                transaction.rollback().await?;
                Err(conflict())
            }
            Err(error) if is_lock_refused(&error) => Err(conflict()),
            Err(error) => Err(error.into()),
        }
    }
}

impl PendingChange {
    /// Notes the ledger entry that recorded the change and makes it visible to every replica.
    pub async fn commit(self, ledger_seq: u64) -> Result<i64, LifecycleStoreError> {
        use lifecycle_row::Column;
        lifecycle_row::Entity::update_many()
            .col_expr(
                Column::LedgerSeq,
                Expr::value(i64::try_from(ledger_seq).unwrap_or(i64::MAX)),
            )
            .filter(Column::ModelName.eq(self.name.as_str()))
            .exec(&self.transaction)
            .await?;
        self.transaction.commit().await?;
        Ok(self.revision)
    }

    /// Drops the change: nothing of it was ever visible.
    pub async fn roll_back(self) {
        if let Err(error) = self.transaction.rollback().await {
            tracing::error!(error = %error, model = %self.name, "lifecycle change not rolled back cleanly");
        }
    }
}

fn encode<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn decode_row(row: lifecycle_row::Model) -> Result<LifecycleState, LifecycleStoreError> {
    let corrupt = |reason: serde_json::Error| LifecycleStoreError::Corrupt {
        name: row.model_name.clone(),
        reason: reason.to_string(),
    };
    Ok(LifecycleState {
        revision: row.revision,
        versions: serde_json::from_str(&row.versions_json).map_err(corrupt)?,
        history: serde_json::from_str(&row.history_json).map_err(corrupt)?,
        rollout: serde_json::from_str(&row.rollout_json).map_err(corrupt)?,
    })
}

fn is_duplicate(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// PostgreSQL's `lock_not_available` (55P03, from NOWAIT) or SQLite's busy database: another
/// writer holds what this change needs.
fn is_lock_refused(error: &DbErr) -> bool {
    let text = error.to_string();
    text.contains("55P03")
        || text.contains("could not obtain lock")
        || text.contains("database is locked")
}

pub(crate) mod migration {
    use sea_orm_migration::prelude::*;

    #[derive(DeriveIden)]
    enum ModelLifecycle {
        Table,
        ModelName,
        Revision,
        VersionsJson,
        HistoryJson,
        LedgerSeq,
        UpdatedAt,
    }

    pub struct CreateModelLifecycle;

    /// The canary and shadow roles of each model (issue 18); `{}` for rows written before.
    pub(crate) fn rollout_column() -> ColumnDef {
        ColumnDef::new(Alias::new("rollout_json"))
            .text()
            .not_null()
            .default("{}")
            .to_owned()
    }

    impl MigrationName for CreateModelLifecycle {
        fn name(&self) -> &str {
            "m0002_create_model_lifecycle"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateModelLifecycle {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use ModelLifecycle as L;
            manager
                .create_table(
                    Table::create()
                        .table(L::Table)
                        .col(
                            ColumnDef::new(L::ModelName)
                                .string()
                                .not_null()
                                .primary_key(),
                        )
                        .col(ColumnDef::new(L::Revision).big_integer().not_null())
                        .col(ColumnDef::new(L::VersionsJson).text().not_null())
                        .col(ColumnDef::new(L::HistoryJson).text().not_null())
                        .col(ColumnDef::new(L::LedgerSeq).big_integer().not_null())
                        .col(ColumnDef::new(L::UpdatedAt).big_integer().not_null())
                        .to_owned(),
                )
                .await
        }
    }
}
