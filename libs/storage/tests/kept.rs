//! A writer's kept connection against the suite's real PostgreSQL: its statements run on one
//! server connection that stays out of the pool between them (so sqlx does not ping it on the
//! way back), and it is given back, and replaced, exactly when a pooled acquire would have
//! found it unfit: after a failed statement, and once idle past the ping threshold.

use std::time::Duration;

use medai_storage::KeptConnection;
use sea_orm::DatabaseConnection;
use sea_orm::sqlx::{self, PgPool};

mod support;
use support::terminate;

async fn backend_pid(kept: &mut KeptConnection) -> Result<i32, sqlx::Error> {
    let connection = kept.connection().await?;
    let outcome = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
        .fetch_one(connection)
        .await;
    kept.outcome(outcome)
}

async fn pool_of_one(url: &str) -> (DatabaseConnection, PgPool) {
    let connection = medai_storage::connect_with_max_connections(url, 1)
        .await
        .expect("connect");
    let pool = connection.get_postgres_connection_pool().clone();
    (connection, pool)
}

#[tokio::test]
async fn statements_run_on_one_connection_that_stays_out_of_the_pool_until_given_back() {
    let url = medai_testkit::fresh_postgres_database().await;
    let (_connection, pool) = pool_of_one(&url).await;
    let mut kept = KeptConnection::new(pool.clone());
    assert!(
        !kept.is_kept(),
        "nothing is taken before the first statement"
    );

    let first = backend_pid(&mut kept).await.expect("first");
    for _ in 0..20 {
        assert_eq!(backend_pid(&mut kept).await.expect("again"), first);
    }
    assert!(kept.is_kept());
    // Never returned between statements: the pool's only connection is not in it.
    assert_eq!(pool.num_idle(), 0);
    assert!(pool.try_acquire().is_none(), "the kept connection is out");

    kept.give_back();
    let back = tokio::time::timeout(Duration::from_secs(10), pool.acquire())
        .await
        .expect("given back to the pool")
        .expect("acquire");
    drop(back);
    // The next statement takes one afresh (the same server connection: it was sound).
    assert_eq!(backend_pid(&mut kept).await.expect("afresh"), first);
}

#[tokio::test]
async fn a_failed_statement_gives_the_connection_back_and_the_next_one_is_served() {
    let url = medai_testkit::fresh_postgres_database().await;
    let (_connection, pool) = pool_of_one(&url).await;
    let mut kept = KeptConnection::new(pool);
    let first = backend_pid(&mut kept).await.expect("first");

    // The server refuses a statement: given back (the pool's ping finds it sound).
    let connection = kept.connection().await.expect("connection");
    let refused = sqlx::query("SELECT 1 / 0").execute(connection).await;
    assert!(kept.outcome(refused).is_err(), "division by zero");
    assert!(!kept.is_kept());
    assert_eq!(backend_pid(&mut kept).await.expect("served"), first);

    // The server dropped it while it was hot: that one statement fails, the connection is
    // given back (and closed by the pool's ping), and the next statement gets a new one.
    let last_used = std::time::Instant::now();
    terminate(first).await;
    let answer = backend_pid(&mut kept).await;
    if last_used.elapsed() < medai_storage::PING_IF_IDLE_FOR {
        assert!(answer.is_err(), "its server end is gone: {answer:?}");
        assert!(!kept.is_kept());
    } else {
        eprintln!("the machine took longer than the threshold; the hot case is not judged");
    }
    let second = tokio::time::timeout(Duration::from_secs(10), backend_pid(&mut kept))
        .await
        .expect("a connection")
        .expect("served on a new connection");
    assert_ne!(second, first);
}

#[tokio::test]
async fn a_connection_kept_idle_past_the_ping_threshold_is_replaced_before_a_statement_fails() {
    let url = medai_testkit::fresh_postgres_database().await;
    let (_connection, pool) = pool_of_one(&url).await;
    let mut kept = KeptConnection::new(pool);
    let first = backend_pid(&mut kept).await.expect("first");

    // A server restart, a proxy's idle timeout or an operator ends it while the writer idles.
    terminate(first).await;
    tokio::time::sleep(medai_storage::PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
    let second = tokio::time::timeout(Duration::from_secs(10), backend_pid(&mut kept))
        .await
        .expect("a connection")
        .expect("no statement fails: the idle connection was checked and replaced");
    assert_ne!(second, first);
}

#[tokio::test]
async fn a_sea_orm_statement_runs_with_its_values_bound() {
    use sea_orm::ExprTrait;
    use sea_orm::sea_query::{Alias, Expr, Query};
    use sea_orm::sqlx::Row;
    let url = medai_testkit::fresh_postgres_database().await;
    let (_connection, pool) = pool_of_one(&url).await;
    let mut kept = KeptConnection::new(pool);
    let statement = Query::select()
        .expr_as(Expr::val("a 'quoted' value"), Alias::new("text"))
        .expr_as(Expr::val(41_i64).add(1), Alias::new("number"))
        .to_owned();
    let rows = kept.fetch_all(&statement).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].try_get::<String, _>("text").expect("text"),
        "a 'quoted' value"
    );
    assert_eq!(rows[0].try_get::<i64, _>("number").expect("number"), 42);
    assert!(kept.is_kept());
}

#[tokio::test]
async fn a_writer_waiting_for_work_gives_its_connection_back_once_idle_and_when_the_pool_closes() {
    let url = medai_testkit::fresh_postgres_database().await;
    let (_connection, pool) = pool_of_one(&url).await;
    let mut kept = KeptConnection::new(pool.clone());
    let first = backend_pid(&mut kept).await.expect("first");

    // Work that comes at once: kept through the wait.
    let work = KeptConnection::await_work(Some(&mut kept), async { 7 }).await;
    assert_eq!(work, 7);
    assert!(kept.is_kept());

    // A writer idle past the ping threshold holds no connection: others on the pool get it.
    let (send, receive) = tokio::sync::oneshot::channel::<u32>();
    let writer = tokio::spawn(async move {
        let work = KeptConnection::await_work(Some(&mut kept), receive).await;
        (kept, work)
    });
    let other = tokio::time::timeout(
        medai_storage::PING_IF_IDLE_FOR + Duration::from_secs(10),
        pool.acquire(),
    )
    .await
    .expect("the idle writer's connection came back to the pool")
    .expect("acquire");
    drop(other);
    send.send(8).expect("the writer waits");
    let (mut kept, work) = writer.await.expect("writer");
    assert_eq!(work.expect("work"), 8);
    assert!(!kept.is_kept());
    assert_eq!(backend_pid(&mut kept).await.expect("taken afresh"), first);

    // A pool closing while the writer waits (a store shutting down) is not held up by it.
    let (_send, receive) = tokio::sync::oneshot::channel::<u32>();
    let writer = tokio::spawn(async move {
        let _ = KeptConnection::await_work(Some(&mut kept), receive).await;
        kept
    });
    tokio::time::timeout(Duration::from_millis(900), pool.close())
        .await
        .expect("the pool closed before the idle give-back");
    writer.abort();
}
