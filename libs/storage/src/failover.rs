//! PostgreSQL connection strings that name several servers, as libpq reads them:
//! `postgres://user@primary:5432,standby:5432/db?target_session_attrs=read-write`.
//!
//! sqlx (under sea-orm) opens one host only and does not know `target_session_attrs`, so
//! [`connect_to_one_of`] does what libpq does at connect time and keeps doing it afterwards:
//! it tries each host in order and opens the pool on the first one that qualifies (for
//! `read-write`/`primary`: not in recovery and not read-only). A watcher then probes that server
//! through the pool; when it is gone or has become read-only, the hosts are tried again and the
//! pool's future connections go to the new read-write server (`Pool::set_connect_options`).
//! Connections opened before the switch are closed when next taken from the pool, so no write
//! goes to a demoted server. A promoted standby is thus found within one watch interval plus the
//! time its promotion takes, without restarting the service.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sea_orm::sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool};
use sea_orm::{DatabaseConnection, DbErr, SqlxPostgresConnector};

/// How often the watcher checks that the pool's server is still the one to use.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe (of the pool's server, or of one candidate host) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// True when the server cannot take writes: a standby, or one set read-only.
const READ_ONLY_QUERY: &str = "SELECT pg_catalog.pg_is_in_recovery() OR pg_catalog.current_setting('transaction_read_only') = 'on'";
/// Counts switches of a pool to another server (label `to`: the host's position in the list,
/// never an address or a name).
pub const FAILOVER_COUNTER: &str = "medai_database_failovers_total";

/// libpq's `target_session_attrs`, the values that make sense for a writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// The first server that accepts a connection (libpq's default).
    Any,
    /// The first server that is not in recovery and not read-only (`read-write` or `primary`).
    ReadWrite,
}

/// A connection string split into one single-host URL per server, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostList {
    /// `postgres://user@host:port/db?…` for each host, `target_session_attrs` removed.
    pub single_host_urls: Vec<String>,
    pub attrs: TargetSessionAttrs,
}

impl HostList {
    /// Splits `url` if it names several hosts or asks for `target_session_attrs`; `None` when
    /// it is an ordinary one-host URL (or not PostgreSQL at all).
    pub fn parse(url: &str) -> Result<Option<Self>, DbErr> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(None);
        };
        if scheme != "postgres" && scheme != "postgresql" {
            return Ok(None);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        let mut attrs = None;
        let mut kept_parameters = Vec::new();
        for parameter in query.into_iter().flat_map(|query| query.split('&')) {
            match parameter.strip_prefix("target_session_attrs=") {
                Some("any") => attrs = Some(TargetSessionAttrs::Any),
                Some("read-write" | "primary") => attrs = Some(TargetSessionAttrs::ReadWrite),
                Some(other) => {
                    return Err(DbErr::Custom(format!(
                        "target_session_attrs={other} is not supported (use any, read-write or primary)"
                    )));
                }
                None if parameter.is_empty() => {}
                None => kept_parameters.push(parameter),
            }
        }
        let hosts: Vec<&str> = hosts.split(',').collect();
        if hosts.len() < 2 && attrs.is_none() {
            return Ok(None);
        }
        if hosts.iter().any(|host| host.is_empty()) {
            return Err(DbErr::Custom(
                "a database URL's host list has an empty entry".to_owned(),
            ));
        }
        let query = if kept_parameters.is_empty() {
            String::new()
        } else {
            format!("?{}", kept_parameters.join("&"))
        };
        Ok(Some(Self {
            single_host_urls: hosts
                .iter()
                .map(|host| format!("{scheme}://{userinfo}{host}{path}{query}"))
                .collect(),
            attrs: attrs.unwrap_or(TargetSessionAttrs::Any),
        }))
    }
}

/// Which server of the list the pool uses, and since when.
struct Target {
    index: usize,
    chosen_at: Instant,
}

/// Opens a pool on the first server of `hosts` that qualifies and keeps it on a qualifying
/// server for as long as the pool is open (see the module documentation). The pool holds at
/// most `max_connections`, as [`crate::connect_with_max_connections`]'s does for one host.
pub async fn connect_to_one_of(
    hosts: HostList,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let options = hosts
        .single_host_urls
        .iter()
        .map(|url| {
            PgConnectOptions::from_str(url)
                .map(|options| options.disable_statement_logging())
                .map_err(|error| DbErr::Custom(format!("a database URL does not parse: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let index = find_qualifying_server(&options, hosts.attrs)
        .await
        .ok_or_else(|| no_server(&hosts))?;
    let target = Arc::new(Mutex::new(Target {
        index,
        chosen_at: Instant::now(),
    }));
    let for_acquire = target.clone();
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        // A connection opened before the last switch may lead to a demoted server: close it.
        // Others are pinged only once idle for a while (see [`crate::PING_IF_IDLE_FOR`]).
        .test_before_acquire(false)
        .before_acquire(move |connection, metadata| {
            let opened_before_switch = for_acquire
                .lock()
                .map(|target| metadata.age > target.chosen_at.elapsed())
                .unwrap_or(false);
            Box::pin(async move {
                if opened_before_switch {
                    return Ok(false);
                }
                if metadata.idle_for >= crate::PING_IF_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options[index].clone())
        .await
        .map_err(|error| DbErr::Conn(sea_orm::RuntimeErr::SqlxError(error.into())))?;
    tokio::spawn(watch(pool.clone(), options, hosts.attrs, target));
    Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
}

fn no_server(hosts: &HostList) -> DbErr {
    let wanted = match hosts.attrs {
        TargetSessionAttrs::Any => "reachable",
        TargetSessionAttrs::ReadWrite => "read-write",
    };
    DbErr::Custom(format!(
        "none of the {} database servers in the URL is {wanted}",
        hosts.single_host_urls.len()
    ))
}

/// The position of the first server that accepts a connection and, for
/// [`TargetSessionAttrs::ReadWrite`], takes writes.
async fn find_qualifying_server(
    options: &[PgConnectOptions],
    attrs: TargetSessionAttrs,
) -> Option<usize> {
    for (index, candidate) in options.iter().enumerate() {
        let probe = async {
            let mut connection = PgConnection::connect_with(candidate).await?;
            let read_only = match attrs {
                TargetSessionAttrs::Any => false,
                TargetSessionAttrs::ReadWrite => {
                    sea_orm::sqlx::query_scalar::<_, bool>(READ_ONLY_QUERY)
                        .fetch_one(&mut connection)
                        .await?
                }
            };
            let _ = connection.close().await;
            Ok::<bool, sea_orm::sqlx::Error>(!read_only)
        };
        if let Ok(Ok(true)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            return Some(index);
        }
    }
    None
}

/// Whether the pool's current server still qualifies.
async fn pool_server_qualifies(pool: &PgPool, attrs: TargetSessionAttrs) -> bool {
    let probe = async {
        let mut connection = pool.acquire().await?;
        sea_orm::sqlx::query_scalar::<_, bool>(READ_ONLY_QUERY)
            .fetch_one(&mut *connection)
            .await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(read_only)) => attrs == TargetSessionAttrs::Any || !read_only,
        _ => false,
    }
}

async fn watch(
    pool: PgPool,
    options: Vec<PgConnectOptions>,
    attrs: TargetSessionAttrs,
    target: Arc<Mutex<Target>>,
) {
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if pool.is_closed() {
            return;
        }
        if pool_server_qualifies(&pool, attrs).await {
            continue;
        }
        let Some(found) = find_qualifying_server(&options, attrs).await else {
            tracing::warn!(
                servers = options.len(),
                "no database server in the list qualifies yet; trying again"
            );
            continue;
        };
        let Ok(mut current) = target.lock() else {
            return;
        };
        if current.index == found {
            continue;
        }
        tracing::warn!(
            from = current.index,
            to = found,
            "the database server in use no longer qualifies; switching to another in the list"
        );
        pool.set_connect_options(options[found].clone());
        current.index = found;
        current.chosen_at = Instant::now();
        metrics::counter!(FAILOVER_COUNTER, "to" => found.to_string()).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_becomes_one_url_per_host_without_target_session_attrs() {
        let hosts = HostList::parse(
            "postgres://medai:secret@10.0.0.1:5432,10.0.0.2:6432/ledger?sslmode=disable&target_session_attrs=read-write",
        )
        .expect("parses")
        .expect("several hosts");
        assert_eq!(
            hosts.single_host_urls,
            [
                "postgres://medai:secret@10.0.0.1:5432/ledger?sslmode=disable",
                "postgres://medai:secret@10.0.0.2:6432/ledger?sslmode=disable",
            ]
        );
        assert_eq!(hosts.attrs, TargetSessionAttrs::ReadWrite);
        for url in &hosts.single_host_urls {
            PgConnectOptions::from_str(url).expect("sqlx reads each single-host URL");
        }
    }

    #[test]
    fn several_hosts_default_to_any_and_primary_means_read_write() {
        let any = HostList::parse("postgresql://a:1,b:2/db")
            .expect("parses")
            .expect("several");
        assert_eq!(any.attrs, TargetSessionAttrs::Any);
        assert_eq!(
            any.single_host_urls,
            ["postgresql://a:1/db", "postgresql://b:2/db"]
        );
        let primary = HostList::parse("postgres://u@a:1/db?target_session_attrs=primary")
            .expect("parses")
            .expect("asks for a primary");
        assert_eq!(primary.attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(primary.single_host_urls, ["postgres://u@a:1/db"]);
    }

    #[test]
    fn one_host_urls_and_other_databases_are_left_alone() {
        assert_eq!(
            HostList::parse("postgres://u@a:1/db?sslmode=require").expect("parses"),
            None
        );
        assert_eq!(
            HostList::parse("sqlite:///tmp/x.sqlite?mode=rwc").expect("parses"),
            None
        );
    }

    #[test]
    fn unknown_session_attrs_and_empty_hosts_are_refused() {
        assert!(HostList::parse("postgres://a:1,b:2/db?target_session_attrs=standby").is_err());
        assert!(HostList::parse("postgres://a:1,,b:2/db").is_err());
    }
}
