//! Password hashing with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane).
//!
//! Hashing is CPU-bound and memory-hard, so two limits apply (issue #14, "no input may exhaust
//! a process"):
//! - [`HashGate`]: at most `max_concurrent_hashes` run at once on the blocking pool, at most
//!   `max_waiting_hashes` wait for a turn; any further caller is refused at once (`AUTH_BUSY`).
//!   Without it N concurrent logins allocate N × 19 MiB together.
//! - Each hash's 19 MiB of argon2 blocks go back to the operating system when it ends
//!   ([`memory_blocks`]); otherwise glibc keeps them in its arenas and the process stays at its
//!   high-water mark.
//!
//! The stored format is the PHC string argon2's own `PasswordHasher` writes
//! (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), unchanged: older hashes still verify.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Hashes currently running, exported as a gauge.
pub const HASHES_IN_PROGRESS: &str = "medai_auth_password_hashes_in_progress";
/// The most hashes that ever ran at once since start, exported as a gauge.
pub const HASHES_PEAK: &str = "medai_auth_password_hashes_peak";
/// Hashes refused because the queue was full.
pub const HASHES_REFUSED: &str = "medai_auth_password_hashes_refused_total";

const MEMORY_KIB: u32 = 19 * 1024;

/// Stored hashes asking for more memory than this never verify: a row written with absurd
/// parameters must not be able to exhaust the process either.
const MAX_VERIFY_MEMORY_KIB: u32 = 256 * 1024;

fn params() -> Params {
    // The parameters are constants that argon2 accepts; fall back to its defaults otherwise.
    Params::new(MEMORY_KIB, 2, 1, None).unwrap_or_default()
}

/// glibc serves an allocation by `mmap` (and returns it with `munmap` on free) when it is at
/// least its mmap threshold. That threshold starts at 128 KiB but rises to the size of any
/// mapped block that is freed, up to `DEFAULT_MMAP_THRESHOLD_MAX` (32 MiB on 64-bit, mallopt(3)).
/// After the first 19 MiB hash it is above 19 MiB, so later hashes come from the heap arenas,
/// whose freed memory glibc keeps: auth's RSS stayed at N × 19 MiB after N concurrent logins.
/// Reserving more than that cap keeps every hash's blocks mapped, unmapped when dropped, and
/// never raises the threshold. Only the pages argon2 writes (19 MiB) become resident; the rest
/// of the reservation is address space. (Setting `M_MMAP_THRESHOLD` with `mallopt` or mapping
/// the blocks directly would need `unsafe`, which the workspace forbids.)
const ALWAYS_MAPPED_BYTES: usize = 33 * 1024 * 1024;

/// Argon2's working memory for `count` blocks, given back to the operating system when dropped.
fn memory_blocks(count: usize) -> Vec<Block> {
    let reserved = count.max(ALWAYS_MAPPED_BYTES / std::mem::size_of::<Block>());
    let mut blocks = Vec::with_capacity(reserved);
    blocks.resize(count, Block::default());
    blocks
}

fn argon2_output(
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    output: &mut [u8],
) -> Result<(), argon2::Error> {
    let mut blocks = memory_blocks(argon2_block_count(argon2));
    argon2.hash_password_into_with_memory(password, salt, output, blocks.as_mut_slice())
}

fn argon2_block_count(argon2: &Argon2<'_>) -> usize {
    argon2.params().block_count()
}

pub const MIN_PASSWORD_CHARS: usize = 12;

/// The password policy: long enough; length beats composition rules (NIST SP 800-63B).
pub fn check_strength(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.chars().count() > 256 {
        return Err("must have at most 256 characters".to_owned());
    }
    Ok(())
}

/// A PHC string for `password` with a fresh salt. Blocking: run it through a [`HashGate`].
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    let params = params();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut salt_buffer = [0_u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buffer)
        .map_err(|error| error.to_string())?;
    let output = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |output| {
        Ok(argon2_output(
            &argon2,
            password.as_bytes(),
            salt_bytes,
            output,
        )?)
    })
    .map_err(|error| error.to_string())?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|error| error.to_string())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// True only for the right password. A malformed stored hash never verifies. Blocking: run it
/// through a [`HashGate`].
pub fn verify_password(password: &str, stored_hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(stored_hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(version) => version.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_VERIFY_MEMORY_KIB {
        return false;
    }
    let argon2 = Argon2::new(algorithm, version, params);
    let mut salt_buffer = [0_u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buffer) else {
        return false;
    };
    let mut computed = vec![0_u8; expected.len()];
    if argon2_output(&argon2, password.as_bytes(), salt_bytes, &mut computed).is_err() {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(&computed).is_ok_and(|computed| computed == expected)
}

/// A hash of a random password, verified against when the user does not exist so that an
/// unknown username costs the same time as a wrong password.
pub fn decoy_hash() -> String {
    let random: String = uuid_like();
    hash_password(&random).unwrap_or_default()
}

fn uuid_like() -> String {
    SaltString::generate(&mut OsRng).as_str().to_owned()
}

/// Refused: `max_waiting_hashes` callers already wait for a hash.
#[derive(Debug, PartialEq, Eq)]
pub struct HashesBusy;

#[derive(Default)]
struct HashCounts {
    in_progress: AtomicUsize,
    peak: AtomicUsize,
}

/// Counts one running hash for as long as it lives.
struct RunningHash(Arc<HashCounts>);

impl RunningHash {
    fn start(counts: &Arc<HashCounts>) -> Self {
        let now = counts.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        let peak = counts.peak.fetch_max(now, Ordering::SeqCst).max(now);
        metrics::gauge!(HASHES_IN_PROGRESS).set(now as f64);
        metrics::gauge!(HASHES_PEAK).set(peak as f64);
        Self(counts.clone())
    }
}

impl Drop for RunningHash {
    fn drop(&mut self) {
        let now = self.0.in_progress.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!(HASHES_IN_PROGRESS).set(now as f64);
    }
}

/// Counts one waiting caller for as long as it waits (also when its call is cancelled).
struct WaitingTurn<'gate>(&'gate AtomicUsize);

impl Drop for WaitingTurn<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs password hashes on the blocking pool, at most `max_concurrent` at once, with at most
/// `max_waiting` callers queued for a turn. A caller whose RPC is cancelled (its deadline
/// passed, it went away) leaves the queue; a hash that already started finishes and keeps its
/// turn until then, so the bound holds for hashes, not for callers.
pub struct HashGate {
    permits: Arc<Semaphore>,
    max_waiting: usize,
    waiting: AtomicUsize,
    counts: Arc<HashCounts>,
}

impl HashGate {
    pub fn new(max_concurrent: usize, max_waiting: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            max_waiting,
            waiting: AtomicUsize::new(0),
            counts: Arc::default(),
        }
    }

    async fn turn(&self) -> Result<OwnedSemaphorePermit, HashesBusy> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaitingTurn(&self.waiting);
        if queued >= self.max_waiting {
            metrics::counter!(HASHES_REFUSED).increment(1);
            return Err(HashesBusy);
        }
        // The semaphore is never closed.
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashesBusy)
    }

    /// Runs `hash` on the blocking pool once a turn is free, or refuses at once when the queue
    /// is full.
    pub async fn run<T: Send + 'static>(
        &self,
        hash: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, GateError> {
        let permit = self.turn().await.map_err(|HashesBusy| GateError::Busy)?;
        let counts = self.counts.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = RunningHash::start(&counts);
            hash()
        })
        .await
        .map_err(|error| GateError::Failed(error.to_string()))
    }

    /// Hashes running now.
    pub fn in_progress(&self) -> usize {
        self.counts.in_progress.load(Ordering::SeqCst)
    }

    /// The most hashes that ever ran at once through this gate.
    pub fn peak_in_progress(&self) -> usize {
        self.counts.peak.load(Ordering::SeqCst)
    }
}

/// Why [`HashGate::run`] gave no result.
#[derive(Debug, PartialEq, Eq)]
pub enum GateError {
    /// The queue of callers waiting for a hash is full.
    Busy,
    /// The hash panicked or the runtime is shutting down.
    Failed(String),
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    use super::*;

    #[test]
    fn right_password_verifies_and_wrong_one_does_not() {
        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse battery!", &hash));
        assert!(!verify_password("anything", "not a phc string"));
    }

    /// Hashes stored before the blocks were given back (written by argon2's own
    /// `PasswordHasher`) still verify, and new ones verify with argon2's own verifier.
    #[test]
    fn the_stored_format_is_unchanged_both_ways() {
        let stock = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        let salt = SaltString::generate(&mut OsRng);
        let old_hash = stock
            .hash_password(b"a password from before", &salt)
            .expect("stock hash")
            .to_string();
        assert!(verify_password("a password from before", &old_hash));
        assert!(!verify_password("a password from after", &old_hash));

        let new_hash = hash_password("a password from after").expect("hash");
        let parsed = PasswordHash::new(&new_hash).expect("a PHC string");
        assert!(
            stock
                .verify_password(b"a password from after", &parsed)
                .is_ok()
        );
        assert!(
            stock
                .verify_password(b"a password from before", &parsed)
                .is_err()
        );
        assert_eq!(
            parsed.hash.expect("output").len(),
            Params::DEFAULT_OUTPUT_LEN
        );
    }

    #[test]
    fn a_stored_hash_asking_for_absurd_memory_never_verifies() {
        let huge = "$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
                    AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(!verify_password("anything at all", huge));
    }

    /// With one turn and one waiting place, a third caller is refused at once while the first
    /// hash runs; the waiting one runs after it; never two at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_queue_bound_a_hash_is_refused_and_never_more_than_the_bound_run() {
        let gate = Arc::new(HashGate::new(1, 1));
        let (release_first, first_released) = std::sync::mpsc::channel::<()>();
        let (first_started, started) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.run(move || {
                    let _ = first_started.send(());
                    first_released.recv().expect("released");
                    "first"
                })
                .await
            }
        });
        started.await.expect("the first hash started");
        assert_eq!(gate.in_progress(), 1);
        let second = tokio::spawn({
            let gate = gate.clone();
            async move { gate.run(|| "second").await }
        });
        // The second caller is queued once the waiting count shows it.
        while gate.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.run(|| "third").await, Err(GateError::Busy));
        release_first.send(()).expect("release");
        assert_eq!(first.await.expect("join"), Ok("first"));
        assert_eq!(second.await.expect("join"), Ok("second"));
        assert_eq!(gate.peak_in_progress(), 1);
        assert_eq!(gate.in_progress(), 0);
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }

    /// A caller whose RPC is cancelled (its deadline passed, it went away) leaves the queue at
    /// once; a hash that already started keeps its turn until it ends, so the bound holds for
    /// hashes even when their callers are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_caller_leaves_the_queue_and_a_started_hash_keeps_its_turn() {
        let gate = Arc::new(HashGate::new(1, 1));
        let (release_first, first_released) = std::sync::mpsc::channel::<()>();
        let (first_started, started) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.run(move || {
                    let _ = first_started.send(());
                    first_released.recv().expect("released");
                })
                .await
            }
        });
        started.await.expect("the first hash started");
        // Its caller goes away: the hash goes on and keeps the only turn.
        first.abort();
        assert!(first.await.expect_err("aborted").is_cancelled());
        assert_eq!(gate.in_progress(), 1);

        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.run(|| "never").await }
        });
        while gate.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The waiting caller's deadline passes: it leaves the queue, which has room again.
        waiting.abort();
        assert!(waiting.await.expect_err("aborted").is_cancelled());
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
        let next = tokio::spawn({
            let gate = gate.clone();
            async move { gate.run(|| "next").await }
        });
        while gate.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.in_progress(),
            1,
            "the abandoned hash still holds the turn"
        );
        release_first.send(()).expect("release");
        assert_eq!(next.await.expect("join"), Ok("next"));
        assert_eq!(gate.peak_in_progress(), 1);
    }
}
