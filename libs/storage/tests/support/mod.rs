//! What the storage tests share.

use sea_orm::ConnectionTrait;

/// Ends a server connection (as a restart, a proxy's idle timeout or an operator would) and
/// waits until it is gone.
pub async fn terminate(pid: i32) {
    let admin = medai_storage::connect(&medai_testkit::suite_postgres_url())
        .await
        .expect("admin");
    admin
        .execute_unprepared(&format!("SELECT pg_terminate_backend({pid}, 10000)"))
        .await
        .expect("terminate");
}
