//! The results store: one row per prediction made for the gateway, preliminary until a
//! clinician signs it. PostgreSQL in production, SQLite as the embedded default.

use sea_orm::{
    ActiveValue, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use sea_orm_migration::MigratorTrait;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::InferenceError;

pub mod result_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "inference_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub result_id: String,
        pub model_name: String,
        pub model_version: String,
        pub model_sha256: String,
        pub image_sha256: String,
        /// Keyed hash from validation; never a patient identifier.
        pub patient_key: String,
        /// `[["label", probability], …]` in the model's label order.
        #[sea_orm(column_type = "Text")]
        pub probabilities_json: String,
        pub top_label: String,
        pub confidence: f64,
        pub decision_threshold: f64,
        pub decision: String,
        pub latency_ms: f64,
        /// Unix microseconds, UTC.
        pub created_at: i64,
        /// PRELIMINARY or SIGNED.
        pub status: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub use result_row::Model as StoredResult;

pub const PRELIMINARY: &str = "PRELIMINARY";
pub const SIGNED: &str = "SIGNED";
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;

/// Filters for [`ResultsStore::list`]; empty fields do not filter.
#[derive(Clone, Debug, Default)]
pub struct ResultFilter {
    pub model_name: String,
    pub status: String,
    pub patient_key: String,
    /// Unix microseconds, inclusive.
    pub created_from: Option<i64>,
    /// Unix microseconds, exclusive.
    pub created_until: Option<i64>,
    pub page_size: u32,
    pub page_token: String,
}

#[derive(Clone)]
pub struct ResultsStore {
    connection: DatabaseConnection,
}

impl ResultsStore {
    pub async fn connect(database_url: &str) -> Result<Self, DbErr> {
        let connection = medai_storage::connect(database_url).await?;
        Migrator::up(&connection, None).await?;
        Ok(Self { connection })
    }

    pub async fn insert(&self, result: StoredResult) -> Result<(), InferenceError> {
        let row = result_row::ActiveModel {
            result_id: ActiveValue::Set(result.result_id),
            model_name: ActiveValue::Set(result.model_name),
            model_version: ActiveValue::Set(result.model_version),
            model_sha256: ActiveValue::Set(result.model_sha256),
            image_sha256: ActiveValue::Set(result.image_sha256),
            patient_key: ActiveValue::Set(result.patient_key),
            probabilities_json: ActiveValue::Set(result.probabilities_json),
            top_label: ActiveValue::Set(result.top_label),
            confidence: ActiveValue::Set(result.confidence),
            decision_threshold: ActiveValue::Set(result.decision_threshold),
            decision: ActiveValue::Set(result.decision),
            latency_ms: ActiveValue::Set(result.latency_ms),
            created_at: ActiveValue::Set(result.created_at),
            status: ActiveValue::Set(result.status),
        };
        result_row::Entity::insert(row)
            .exec(&self.connection)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    pub async fn get(&self, result_id: &str) -> Result<StoredResult, InferenceError> {
        result_row::Entity::find_by_id(result_id.to_owned())
            .one(&self.connection)
            .await
            .map_err(store_error)?
            .ok_or_else(|| InferenceError::ResultNotFound(result_id.to_owned()))
    }

    /// Newest first; returns the page and the token of the next one (empty on the last).
    pub async fn list(
        &self,
        filter: &ResultFilter,
    ) -> Result<(Vec<StoredResult>, String), InferenceError> {
        use result_row::Column;
        let page_size = match u64::from(filter.page_size) {
            0 => DEFAULT_PAGE,
            size if size <= MAX_PAGE => size,
            _ => {
                return Err(InferenceError::QueryInvalid(format!(
                    "page_size must lie in 1..={MAX_PAGE}"
                )));
            }
        };
        let mut condition = Condition::all();
        if !filter.model_name.is_empty() {
            condition = condition.add(Column::ModelName.eq(filter.model_name.clone()));
        }
        if !filter.status.is_empty() {
            if filter.status != PRELIMINARY && filter.status != SIGNED {
                return Err(InferenceError::QueryInvalid(
                    "status must be PRELIMINARY or SIGNED".to_owned(),
                ));
            }
            condition = condition.add(Column::Status.eq(filter.status.clone()));
        }
        if !filter.patient_key.is_empty() {
            condition = condition.add(Column::PatientKey.eq(filter.patient_key.clone()));
        }
        if let Some(from) = filter.created_from {
            condition = condition.add(Column::CreatedAt.gte(from));
        }
        if let Some(until) = filter.created_until {
            condition = condition.add(Column::CreatedAt.lt(until));
        }
        if !filter.page_token.is_empty() {
            let (created_at, result_id) = parse_page_token(&filter.page_token)?;
            condition = condition.add(
                Condition::any().add(Column::CreatedAt.lt(created_at)).add(
                    Condition::all()
                        .add(Column::CreatedAt.eq(created_at))
                        .add(Column::ResultId.lt(result_id)),
                ),
            );
        }
        let mut rows = result_row::Entity::find()
            .filter(condition)
            .order_by_desc(Column::CreatedAt)
            .order_by_desc(Column::ResultId)
            .limit(page_size + 1)
            .all(&self.connection)
            .await
            .map_err(store_error)?;
        let next_page_token = if rows.len() as u64 > page_size {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|last| format!("{}/{}", last.created_at, last.result_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next_page_token))
    }
}

fn parse_page_token(token: &str) -> Result<(i64, String), InferenceError> {
    let invalid = || InferenceError::QueryInvalid("page_token is not one this service gave".into());
    let (created_at, result_id) = token.split_once('/').ok_or_else(invalid)?;
    Ok((
        created_at.parse().map_err(|_| invalid())?,
        result_id.to_owned(),
    ))
}

fn store_error(error: DbErr) -> InferenceError {
    tracing::error!(error = %error, "results store failed");
    InferenceError::Store
}

/// Unix microseconds of `text` (RFC 3339).
pub fn parse_timestamp(text: &str) -> Result<i64, InferenceError> {
    let moment = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| InferenceError::QueryInvalid(format!("{text} is not an RFC 3339 time")))?;
    <i64 as TryFrom<i128>>::try_from(moment.unix_timestamp_nanos() / 1000)
        .map_err(|_| InferenceError::QueryInvalid(format!("{text} is out of range")))
}

/// RFC 3339 UTC of unix microseconds.
pub fn format_timestamp(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|moment| moment.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn now_micros() -> i64 {
    <i64 as TryFrom<i128>>::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000)
        .unwrap_or(i64::MAX)
}

pub use migration::Migrator;

mod migration {
    use sea_orm_migration::prelude::*;

    pub struct Migrator;

    #[async_trait::async_trait]
    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreateResults)]
        }

        fn migration_table_name() -> DynIden {
            "inference_schema_migrations".into_iden()
        }
    }

    #[derive(DeriveIden)]
    enum InferenceResults {
        Table,
        ResultId,
        ModelName,
        ModelVersion,
        ModelSha256,
        ImageSha256,
        PatientKey,
        ProbabilitiesJson,
        TopLabel,
        Confidence,
        DecisionThreshold,
        Decision,
        LatencyMs,
        CreatedAt,
        Status,
    }

    struct CreateResults;

    impl MigrationName for CreateResults {
        fn name(&self) -> &str {
            "m0001_create_inference_results"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateResults {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use InferenceResults as R;
            let text = |column: R| ColumnDef::new(column).string().not_null().to_owned();
            manager
                .create_table(
                    Table::create()
                        .table(R::Table)
                        .col(text(R::ResultId).primary_key())
                        .col(text(R::ModelName))
                        .col(text(R::ModelVersion))
                        .col(text(R::ModelSha256))
                        .col(text(R::ImageSha256))
                        .col(text(R::PatientKey))
                        .col(ColumnDef::new(R::ProbabilitiesJson).text().not_null())
                        .col(text(R::TopLabel))
                        .col(ColumnDef::new(R::Confidence).double().not_null())
                        .col(ColumnDef::new(R::DecisionThreshold).double().not_null())
                        .col(text(R::Decision))
                        .col(ColumnDef::new(R::LatencyMs).double().not_null())
                        .col(ColumnDef::new(R::CreatedAt).big_integer().not_null())
                        .col(text(R::Status))
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_results_by_time")
                        .table(R::Table)
                        .col(R::CreatedAt)
                        .col(R::ResultId)
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_results_by_patient")
                        .table(R::Table)
                        .col(R::PatientKey)
                        .to_owned(),
                )
                .await
        }
    }
}
