//! The bridge's own store: every received instance (its bytes and the UIDs the mesh never
//! sees), where it is on its way (received → inferred → reported), and its result. A C-STORE
//! is acknowledged only after its row is committed here.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

/// Where an instance is. Stored as text.
pub mod state {
    /// Stored and acknowledged; not yet answered by the gateway.
    pub const RECEIVED: &str = "RECEIVED";
    /// The gateway's result is stored; the report is not yet delivered.
    pub const INFERRED: &str = "INFERRED";
    /// The report was accepted by the destination.
    pub const REPORTED: &str = "REPORTED";
    /// The gateway refused the image for good (its reason is kept).
    pub const REFUSED: &str = "REFUSED";
    /// The report could not be delivered within the configured attempts.
    pub const UNDELIVERABLE: &str = "UNDELIVERABLE";
}

pub mod instance {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bridge_instances")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sop_instance_uid: String,
        /// What the mesh sees instead of the UIDs: a random tag.
        #[sea_orm(unique)]
        pub tag: String,
        pub sop_class_uid: String,
        pub series_instance_uid: String,
        pub study_instance_uid: String,
        pub calling_ae_title: String,
        /// The instance as a DICOM Part 10 file.
        pub dicom: Vec<u8>,
        /// Unix milliseconds.
        pub received_at_ms: i64,
        pub state: String,
        /// The gateway's answer (see `crate::report::InferenceOutcome`), JSON.
        #[sea_orm(column_type = "Text", nullable)]
        pub result_json: Option<String>,
        /// The stable reason the gateway gave when it refused the image.
        #[sea_orm(nullable)]
        pub refusal_reason: Option<String>,
        pub report_attempts: i32,
        pub next_report_at_ms: i64,
        #[sea_orm(nullable)]
        pub report_sop_instance_uid: Option<String>,
        #[sea_orm(nullable)]
        pub reported_at_ms: Option<i64>,
        /// The signature the gateway reported after the preliminary report went out, JSON
        /// (see `crate::amendment::SignatureOutcome`).
        #[sea_orm(column_type = "Text", nullable)]
        pub signature_json: Option<String>,
        /// The amended (signed) report once the destination accepted it.
        #[sea_orm(nullable)]
        pub amended_report_sop_instance_uid: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub use instance::Model as StoredInstance;

/// What a received instance brings.
pub struct NewInstance {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
    pub calling_ae_title: String,
    pub dicom: Vec<u8>,
}

/// A study ready to be sent: nothing received for the quiet period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStudy {
    pub study_instance_uid: String,
    /// (tag, SOP Instance UID) of each instance not yet answered, oldest first.
    pub instances: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Outbox {
    connection: DatabaseConnection,
}

pub fn now_ms() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

impl Outbox {
    pub async fn open(database_url: &str) -> Result<Self, DbErr> {
        let connection = medai_storage::connect(database_url).await?;
        medai_storage::migrate::<Migrator>(&connection).await?;
        Ok(Self { connection })
    }

    /// Commits the instance. `Ok(false)` when an instance with that SOP Instance UID is
    /// already stored (a PACS resending it): the first copy is kept, nothing is sent twice.
    pub async fn store(&self, new: NewInstance) -> Result<bool, DbErr> {
        let existing = instance::Entity::find_by_id(new.sop_instance_uid.clone())
            .one(&self.connection)
            .await?;
        if existing.is_some() {
            return Ok(false);
        }
        let row = instance::ActiveModel {
            sop_instance_uid: Set(new.sop_instance_uid),
            tag: Set(uuid::Uuid::new_v4().to_string()),
            sop_class_uid: Set(new.sop_class_uid),
            series_instance_uid: Set(new.series_instance_uid),
            study_instance_uid: Set(new.study_instance_uid),
            calling_ae_title: Set(new.calling_ae_title),
            dicom: Set(new.dicom),
            received_at_ms: Set(now_ms()),
            state: Set(state::RECEIVED.to_owned()),
            result_json: Set(None),
            refusal_reason: Set(None),
            report_attempts: Set(0),
            next_report_at_ms: Set(0),
            report_sop_instance_uid: Set(None),
            reported_at_ms: Set(None),
            signature_json: Set(None),
            amended_report_sop_instance_uid: Set(None),
        };
        match instance::Entity::insert(row).exec(&self.connection).await {
            Ok(_) => {
                metrics::counter!(crate::telemetry::INSTANCES_STORED).increment(1);
                Ok(true)
            }
            // Two associations racing with the same instance: the other one stored it.
            Err(error) if is_unique_violation(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Studies with unanswered instances and nothing received for `quiet_period_ms`.
    pub async fn quiet_studies(&self, quiet_period_ms: u64) -> Result<Vec<PendingStudy>, DbErr> {
        let rows: Vec<(String, String, String, i64)> = instance::Entity::find()
            .select_only()
            .column(instance::Column::StudyInstanceUid)
            .column(instance::Column::Tag)
            .column(instance::Column::SopInstanceUid)
            .column(instance::Column::ReceivedAtMs)
            .filter(instance::Column::State.eq(state::RECEIVED))
            .order_by_asc(instance::Column::ReceivedAtMs)
            .into_tuple()
            .all(&self.connection)
            .await?;
        let cutoff = now_ms().saturating_sub(i64::try_from(quiet_period_ms).unwrap_or(i64::MAX));
        let mut studies: Vec<(PendingStudy, i64)> = Vec::new();
        for (study, tag, sop, received) in rows {
            match studies
                .iter_mut()
                .find(|(pending, _)| pending.study_instance_uid == study)
            {
                Some((pending, latest)) => {
                    pending.instances.push((tag, sop));
                    *latest = (*latest).max(received);
                }
                None => studies.push((
                    PendingStudy {
                        study_instance_uid: study,
                        instances: vec![(tag, sop)],
                    },
                    received,
                )),
            }
        }
        Ok(studies
            .into_iter()
            .filter(|(_, latest)| *latest <= cutoff)
            .map(|(pending, _)| pending)
            .collect())
    }

    pub async fn dicom_of(&self, tag: &str) -> Result<Option<Vec<u8>>, DbErr> {
        instance::Entity::find()
            .select_only()
            .column(instance::Column::Dicom)
            .filter(instance::Column::Tag.eq(tag))
            .into_tuple::<Vec<u8>>()
            .one(&self.connection)
            .await
    }

    /// Keeps the gateway's answer for the instance tagged `tag`.
    pub async fn record_result(&self, tag: &str, result_json: String) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(instance::Column::State, Expr::value(state::INFERRED))
            .col_expr(instance::Column::ResultJson, Expr::value(result_json))
            .filter(instance::Column::Tag.eq(tag))
            .filter(instance::Column::State.eq(state::RECEIVED))
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    pub async fn record_refusal(&self, tag: &str, reason: &str) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(instance::Column::State, Expr::value(state::REFUSED))
            .col_expr(instance::Column::RefusalReason, Expr::value(reason))
            .filter(instance::Column::Tag.eq(tag))
            .filter(instance::Column::State.eq(state::RECEIVED))
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    /// Inferred instances whose report is due, oldest first.
    pub async fn due_reports(&self, limit: u64) -> Result<Vec<StoredInstance>, DbErr> {
        instance::Entity::find()
            .filter(instance::Column::State.eq(state::INFERRED))
            .filter(instance::Column::NextReportAtMs.lte(now_ms()))
            .order_by_asc(instance::Column::ReceivedAtMs)
            .limit(limit)
            .all(&self.connection)
            .await
    }

    pub async fn record_reported(&self, tag: &str, report_uid: &str) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(instance::Column::State, Expr::value(state::REPORTED))
            .col_expr(
                instance::Column::ReportSopInstanceUid,
                Expr::value(report_uid),
            )
            .col_expr(instance::Column::ReportedAtMs, Expr::value(now_ms()))
            // The attempts and back-off start again for the amended report, if one follows.
            .col_expr(instance::Column::ReportAttempts, Expr::value(0))
            .col_expr(instance::Column::NextReportAtMs, Expr::value(0i64))
            .filter(instance::Column::Tag.eq(tag))
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    /// Counts a failed delivery; after `max_attempts` the report is given up as undeliverable.
    pub async fn record_delivery_failure(
        &self,
        row: &StoredInstance,
        max_attempts: u32,
        retry_at_ms: i64,
    ) -> Result<(), DbErr> {
        let attempts = row.report_attempts.saturating_add(1);
        let next_state = if u32::try_from(attempts).unwrap_or(u32::MAX) >= max_attempts {
            state::UNDELIVERABLE
        } else {
            state::INFERRED
        };
        instance::Entity::update_many()
            .col_expr(instance::Column::State, Expr::value(next_state))
            .col_expr(instance::Column::ReportAttempts, Expr::value(attempts))
            .col_expr(instance::Column::NextReportAtMs, Expr::value(retry_at_ms))
            .filter(instance::Column::Tag.eq(row.tag.as_str()))
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    /// How many instances are in each state (states without rows are absent).
    pub async fn counts_by_state(&self) -> Result<Vec<(String, i64)>, DbErr> {
        instance::Entity::find()
            .select_only()
            .column(instance::Column::State)
            .column_as(
                Expr::from(sea_orm::sea_query::Func::count(Expr::col(
                    instance::Column::SopInstanceUid,
                ))),
                "count",
            )
            .group_by(instance::Column::State)
            .into_tuple()
            .all(&self.connection)
            .await
    }

    /// Reported instances whose result is not known to be signed yet: (tag, stored result JSON,
    /// received at).
    pub async fn reported_unsigned(&self) -> Result<Vec<(String, String, i64)>, DbErr> {
        let rows: Vec<(String, Option<String>, i64)> = instance::Entity::find()
            .select_only()
            .column(instance::Column::Tag)
            .column(instance::Column::ResultJson)
            .column(instance::Column::ReceivedAtMs)
            .filter(instance::Column::State.eq(state::REPORTED))
            .filter(instance::Column::SignatureJson.is_null())
            .into_tuple()
            .all(&self.connection)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(tag, result, received)| result.map(|result| (tag, result, received)))
            .collect())
    }

    /// Keeps the signature of a reported instance's result (once; a later one changes nothing).
    pub async fn record_signature(&self, tag: &str, signature_json: String) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(instance::Column::SignatureJson, Expr::value(signature_json))
            .filter(instance::Column::Tag.eq(tag))
            .filter(instance::Column::SignatureJson.is_null())
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    /// Signed instances whose amended report is not yet delivered and whose back-off (after a
    /// failed attempt) has passed, oldest first.
    pub async fn due_amendments(&self, limit: u64) -> Result<Vec<StoredInstance>, DbErr> {
        instance::Entity::find()
            .filter(instance::Column::State.eq(state::REPORTED))
            .filter(instance::Column::SignatureJson.is_not_null())
            .filter(instance::Column::AmendedReportSopInstanceUid.is_null())
            .filter(instance::Column::NextReportAtMs.lte(now_ms()))
            .order_by_asc(instance::Column::ReceivedAtMs)
            .limit(limit)
            .all(&self.connection)
            .await
    }

    /// Counts a failed delivery of an amended report: it stays due (an amended report is never
    /// given up, the signature must reach the PACS) and waits until `retry_at_ms`.
    pub async fn record_amendment_failure(
        &self,
        row: &StoredInstance,
        retry_at_ms: i64,
    ) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(
                instance::Column::ReportAttempts,
                Expr::value(row.report_attempts.saturating_add(1)),
            )
            .col_expr(instance::Column::NextReportAtMs, Expr::value(retry_at_ms))
            .filter(instance::Column::Tag.eq(row.tag.as_str()))
            .filter(instance::Column::AmendedReportSopInstanceUid.is_null())
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    pub async fn record_amended(&self, tag: &str, report_uid: &str) -> Result<(), DbErr> {
        instance::Entity::update_many()
            .col_expr(
                instance::Column::AmendedReportSopInstanceUid,
                Expr::value(report_uid),
            )
            .filter(instance::Column::Tag.eq(tag))
            .exec(&self.connection)
            .await?;
        Ok(())
    }

    pub async fn all(&self) -> Result<Vec<StoredInstance>, DbErr> {
        instance::Entity::find()
            .order_by_asc(instance::Column::ReceivedAtMs)
            .all(&self.connection)
            .await
    }
}

fn is_unique_violation(error: &DbErr) -> bool {
    matches!(
        error.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

pub use migration::Migrator;

mod migration {
    use sea_orm_migration::prelude::*;

    pub struct Migrator;

    #[async_trait::async_trait]
    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreateInstances), Box::new(AddAmendments)]
        }

        fn migration_table_name() -> DynIden {
            "bridge_schema_migrations".into_iden()
        }
    }

    #[derive(DeriveIden)]
    enum BridgeInstances {
        Table,
        SopInstanceUid,
        Tag,
        SopClassUid,
        SeriesInstanceUid,
        StudyInstanceUid,
        CallingAeTitle,
        Dicom,
        ReceivedAtMs,
        State,
        ResultJson,
        RefusalReason,
        ReportAttempts,
        NextReportAtMs,
        ReportSopInstanceUid,
        ReportedAtMs,
    }

    struct CreateInstances;

    /// Issue 15: a signature after the preliminary report sends an amended one.
    struct AddAmendments;

    impl MigrationName for AddAmendments {
        fn name(&self) -> &str {
            "m0002_add_bridge_amendments"
        }
    }

    #[derive(DeriveIden)]
    enum Amendments {
        SignatureJson,
        AmendedReportSopInstanceUid,
    }

    #[async_trait::async_trait]
    impl MigrationTrait for AddAmendments {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            // One column per statement: SQLite adds one at a time.
            manager
                .alter_table(
                    Table::alter()
                        .table(BridgeInstances::Table)
                        .add_column(ColumnDef::new(Amendments::SignatureJson).text().null())
                        .to_owned(),
                )
                .await?;
            manager
                .alter_table(
                    Table::alter()
                        .table(BridgeInstances::Table)
                        .add_column(
                            ColumnDef::new(Amendments::AmendedReportSopInstanceUid)
                                .string_len(64)
                                .null(),
                        )
                        .to_owned(),
                )
                .await
        }
    }

    impl MigrationName for CreateInstances {
        fn name(&self) -> &str {
            "m0001_create_bridge_instances"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateInstances {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(BridgeInstances::Table)
                        .col(
                            ColumnDef::new(BridgeInstances::SopInstanceUid)
                                .string_len(64)
                                .not_null()
                                .primary_key(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::Tag)
                                .string_len(64)
                                .not_null()
                                .unique_key(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::SopClassUid)
                                .string_len(64)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::SeriesInstanceUid)
                                .string_len(64)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::StudyInstanceUid)
                                .string_len(64)
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::CallingAeTitle)
                                .string_len(16)
                                .not_null(),
                        )
                        .col(ColumnDef::new(BridgeInstances::Dicom).blob().not_null())
                        .col(
                            ColumnDef::new(BridgeInstances::ReceivedAtMs)
                                .big_integer()
                                .not_null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::State)
                                .string_len(16)
                                .not_null(),
                        )
                        .col(ColumnDef::new(BridgeInstances::ResultJson).text().null())
                        .col(
                            ColumnDef::new(BridgeInstances::RefusalReason)
                                .string()
                                .null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::ReportAttempts)
                                .integer()
                                .not_null()
                                .default(0),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::NextReportAtMs)
                                .big_integer()
                                .not_null()
                                .default(0),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::ReportSopInstanceUid)
                                .string_len(64)
                                .null(),
                        )
                        .col(
                            ColumnDef::new(BridgeInstances::ReportedAtMs)
                                .big_integer()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("bridge_instances_state")
                        .table(BridgeInstances::Table)
                        .col(BridgeInstances::State)
                        .to_owned(),
                )
                .await
        }
    }
}
