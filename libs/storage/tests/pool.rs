//! The pool against the suite's real PostgreSQL: a connection used a moment ago is handed out
//! without a ping, and one the server dropped while it sat idle for longer is replaced before
//! any statement reaches it.

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};

mod support;
use support::terminate;

async fn backend_pid(connection: &DatabaseConnection) -> Result<i32, DbErr> {
    connection
        .query_one_raw(Statement::from_string(
            connection.get_database_backend(),
            "SELECT pg_backend_pid() AS pid",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("no row".to_owned()))?
        .try_get::<i32>("", "pid")
}

#[tokio::test]
async fn a_connection_idle_past_the_threshold_is_pinged_and_a_hot_one_is_not() {
    let url = medai_testkit::fresh_postgres_database().await;
    let pool = medai_storage::connect_with_max_connections(&url, 1)
        .await
        .expect("connect");

    // A connection used a moment ago is handed out as it is, without a round trip to check it:
    // when the server dropped it meanwhile, the statement fails, the connection is closed and
    // the next statement gets a new one.
    let first = backend_pid(&pool).await.expect("first");
    let last_used = Instant::now();
    // sqlx pings a connection as it goes back to the pool, on a task of its own: the server
    // ends it only after that ping (a ping that found it gone would discard it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    terminate(first).await;
    let answer = backend_pid(&pool).await;
    if last_used.elapsed() < medai_storage::PING_IF_IDLE_FOR {
        assert!(
            answer.is_err(),
            "the hot connection was checked: {answer:?}"
        );
    } else {
        eprintln!("the machine took longer than the threshold; the hot case is not judged");
    }
    let second = backend_pid(&pool).await.expect("a new connection");
    assert_ne!(second, first);
    assert_eq!(backend_pid(&pool).await.expect("again"), second, "reused");

    // Idle past the threshold, a connection is pinged on acquire, found gone and replaced: the
    // statement succeeds on a new server connection.
    terminate(second).await;
    tokio::time::sleep(medai_storage::PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
    let third = backend_pid(&pool)
        .await
        .expect("replaced before the statement");
    assert_ne!(third, second);
}
