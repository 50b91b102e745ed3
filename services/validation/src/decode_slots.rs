//! A bound on decodes running at once. Each accepted image may decode to up to
//! `max_decoded_bytes`; without a bound, many legal but large images arriving together could
//! exhaust memory. Calls beyond the bound wait for a slot (the caller's deadline still applies).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinError;

#[derive(Clone, Debug)]
pub struct DecodeSlots {
    slots: Arc<Semaphore>,
}

impl DecodeSlots {
    pub fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
        }
    }

    /// Runs `work` on the blocking pool once a slot is free; a panic in it becomes `Err`.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JoinError> {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self.slots.clone().acquire_owned().await;
        let outcome = tokio::task::spawn_blocking(work).await;
        drop(permit);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn no_more_than_the_bound_run_at_once() {
        let slots = DecodeSlots::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (slots, running, most) = (slots.clone(), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                slots
                    .run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .expect("work");
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_frees_its_slot() {
        let slots = DecodeSlots::new(1);
        assert!(slots.run(|| panic!("codec bug")).await.is_err());
        assert_eq!(slots.run(|| 7).await.expect("the slot is free again"), 7);
    }
}
