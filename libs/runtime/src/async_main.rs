//! The tokio runtime every binary runs on, sized by `TOKIO_WORKER_THREADS` (set by `medai up`
//! and by the chart from the container's CPU request). tokio itself panics at start on a value
//! that is not a whole number of at least 1; a binary here refuses it as a configuration error
//! (exit code 2) with a message naming the variable instead.

use std::future::Future;
use std::process::ExitCode;

/// The variable that sizes a binary's runtime, as tokio names it.
pub const WORKER_THREADS_VARIABLE: &str = "TOKIO_WORKER_THREADS";

/// The worker count `TOKIO_WORKER_THREADS` asks for: `None` when unset (one per core).
pub fn requested_worker_threads(value: Option<&std::ffi::OsStr>) -> Result<Option<usize>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.to_str().map(|text| text.trim().parse::<usize>()) {
        Some(Ok(count)) if count >= 1 => Ok(Some(count)),
        _ => Err(format!(
            "{WORKER_THREADS_VARIABLE} must be a whole number of at least 1, not {value:?}"
        )),
    }
}

/// Runs `main` on a multi-threaded runtime with the requested worker count (one per core when
/// unset); `binary` names the program in the refusal of a bad count.
pub fn run<F>(binary: &str, main: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let workers =
        match requested_worker_threads(std::env::var_os(WORKER_THREADS_VARIABLE).as_deref()) {
            Ok(Some(count)) => count,
            Ok(None) => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            Err(refusal) => {
                eprintln!("{binary}: {refusal}");
                return ExitCode::from(2);
            }
        };
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(main),
        Err(error) => {
            eprintln!("{binary}: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn a_count_of_at_least_one_is_taken_and_unset_means_the_default() {
        assert_eq!(requested_worker_threads(None), Ok(None));
        assert_eq!(requested_worker_threads(Some(OsStr::new("1"))), Ok(Some(1)));
        assert_eq!(
            requested_worker_threads(Some(OsStr::new(" 8 "))),
            Ok(Some(8))
        );
    }

    #[test]
    fn zero_negative_fractional_and_empty_counts_are_refused_naming_the_variable() {
        for bad in ["0", "-1", "1.5", "", "two", "99999999999999999999999"] {
            let refusal = requested_worker_threads(Some(OsStr::new(bad)))
                .expect_err("a bad count is refused");
            assert!(
                refusal.starts_with("TOKIO_WORKER_THREADS must be a whole number of at least 1"),
                "{refusal}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_count_that_is_not_unicode_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        assert!(requested_worker_threads(Some(OsStr::from_bytes(b"\xff"))).is_err());
    }
}
