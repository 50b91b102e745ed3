//! Bounds on decodes running at once, by count and by memory. Decoding is CPU-bound, so at most
//! `slots` run together; and each decode first takes the memory its header says it may hold
//! from a byte budget shared by the whole server, so many large images, or many small files
//! that declare large ones, cannot exhaust memory together. A decode larger than the whole
//! budget is refused; others wait for memory to be returned (the caller's deadline still
//! applies: the deadline layer drops the waiting call).
//!
//! Decodes run on the blocking pool so the runtime's threads keep serving calls, except a small
//! one ([`DecodeSlots::run_small_inline`]) that finds no other decode running: it runs on the
//! calling task's thread, because the hand-off to the pool and back (two thread wake-ups) is a
//! large part of a small image's whole decode.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// The budget's unit: one permit is one KiB (tokio takes at most `u32::MAX` permits at once).
const PERMIT_BYTES: u64 = 1024;

#[derive(Clone, Debug)]
pub struct DecodeSlots {
    slots: Arc<Semaphore>,
    slot_count: usize,
    memory: Arc<Semaphore>,
    memory_budget_bytes: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SlotError {
    /// The decode alone needs more memory than the whole budget.
    OverBudget { needed: u64, budget: u64 },
    /// The work panicked (a third-party codec); its slot and memory are returned.
    Panicked,
}

impl DecodeSlots {
    pub fn new(slots: usize, memory_budget_bytes: u64) -> Self {
        let permits = (memory_budget_bytes / PERMIT_BYTES)
            .min(u64::from(u32::MAX))
            .min(Semaphore::MAX_PERMITS as u64)
            .max(1);
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            slot_count: slots.max(1),
            memory: Arc::new(Semaphore::new(permits as usize)),
            memory_budget_bytes: permits * PERMIT_BYTES,
        }
    }

    /// Runs `work` on the blocking pool once `memory_bytes` of the budget and a slot are free.
    /// Both are held until `work` returns, even if the caller stops waiting for it.
    pub async fn run<T: Send + 'static>(
        &self,
        memory_bytes: u64,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SlotError> {
        let held = self.acquire(memory_bytes).await?;
        on_the_blocking_pool(held, work).await
    }

    /// [`Self::run`], except that when no other decode is running `work` runs on the calling
    /// task's thread (a panic is still [`SlotError::Panicked`]). Only for work the caller knows
    /// to be small: it holds up this thread's other calls while it runs.
    pub async fn run_small_inline<T: Send + 'static>(
        &self,
        memory_bytes: u64,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SlotError> {
        let held = self.acquire(memory_bytes).await?;
        let only_this_one = self.slots.available_permits() + 1 == self.slot_count;
        if !only_this_one {
            return on_the_blocking_pool(held, work).await;
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
        drop(held);
        outcome.map_err(|_| SlotError::Panicked)
    }

    /// Waits for `memory_bytes` of the budget and then a slot.
    async fn acquire(&self, memory_bytes: u64) -> Result<Held, SlotError> {
        let permits = memory_bytes.div_ceil(PERMIT_BYTES);
        if permits * PERMIT_BYTES > self.memory_budget_bytes {
            return Err(SlotError::OverBudget {
                needed: memory_bytes,
                budget: self.memory_budget_bytes,
            });
        }
        // Neither semaphore is ever closed, so acquiring only waits. Memory first: a call
        // waiting for memory holds no slot another could decode in.
        let memory = self
            .memory
            .clone()
            .acquire_many_owned(permits as u32)
            .await
            .map_err(|_| SlotError::Panicked)?;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SlotError::Panicked)?;
        Ok((memory, slot))
    }
}

/// The memory and slot permits a decode holds while it runs.
type Held = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// Runs `work` on the blocking pool holding `held` until it returns, even if the caller stops
/// waiting for it.
async fn on_the_blocking_pool<T: Send + 'static>(
    held: Held,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SlotError> {
    tokio::task::spawn_blocking(move || {
        let _held = held;
        work()
    })
    .await
    .map_err(|_| SlotError::Panicked)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn no_more_than_the_bound_run_at_once() {
        let slots = DecodeSlots::new(2, 1 << 30);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (slots, running, most) = (slots.clone(), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                slots
                    .run(0, move || {
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
    async fn decodes_hold_no_more_memory_together_than_the_budget() {
        // Eight slots, but memory for only three 30 MiB decodes at once.
        let slots = DecodeSlots::new(8, 100 * MIB);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (slots, running, most) = (slots.clone(), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                slots
                    .run(30 * MIB, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .expect("fits the budget");
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_decode_larger_than_the_whole_budget_is_refused_not_queued() {
        let slots = DecodeSlots::new(2, 100 * MIB);
        assert_eq!(
            slots.run(100 * MIB + 1, || ()).await,
            Err(SlotError::OverBudget {
                needed: 100 * MIB + 1,
                budget: 100 * MIB
            })
        );
        assert_eq!(slots.run(100 * MIB, || 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_leaves_the_budget_whole() {
        let slots = DecodeSlots::new(2, 100 * MIB);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, holding) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .run(80 * MIB, move || {
                        started.send(()).expect("started");
                        released.recv().expect("release");
                    })
                    .await
            })
        };
        holding.await.expect("the holder runs");
        // Until the holder is done, 80 of 100 MiB are taken: a 50 MiB decode waits, and its
        // caller's deadline passes.
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            slots.run(50 * MIB, || "decoded"),
        )
        .await;
        assert!(waited.is_err(), "it waits for memory: {waited:?}");
        release.send(()).expect("release");
        holder.await.expect("holder").expect("holder ran");
        // Nothing was leaked by the abandoned wait: the whole budget is there again.
        assert_eq!(slots.run(100 * MIB, || "decoded").await, Ok("decoded"));
    }

    #[tokio::test]
    async fn a_small_decode_runs_on_the_calling_thread_only_when_no_other_decode_runs() {
        let slots = DecodeSlots::new(2, 100 * MIB);
        let caller = std::thread::current().id();
        let ran_on = slots
            .run_small_inline(MIB, || std::thread::current().id())
            .await
            .expect("ran");
        assert_eq!(ran_on, caller, "alone, it runs on the calling thread");
        // While another decode holds a slot, the small one goes to the blocking pool.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, holding) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .run(MIB, move || {
                        started.send(()).expect("started");
                        released.recv().expect("release");
                    })
                    .await
            })
        };
        holding.await.expect("the holder runs");
        let ran_on = slots
            .run_small_inline(MIB, || std::thread::current().id())
            .await
            .expect("ran");
        assert_ne!(ran_on, caller, "beside another decode, it goes to the pool");
        release.send(()).expect("release");
        holder.await.expect("holder").expect("holder ran");
        // Inline, a panic is a refusal too, and the slot and memory come back.
        assert_eq!(
            slots
                .run_small_inline(100 * MIB, || panic!("codec bug"))
                .await,
            Err::<(), _>(SlotError::Panicked)
        );
        assert_eq!(slots.run(100 * MIB, || 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_frees_its_slot_and_memory() {
        let slots = DecodeSlots::new(1, 10 * MIB);
        assert_eq!(
            slots.run(10 * MIB, || panic!("codec bug")).await,
            Err::<(), _>(SlotError::Panicked)
        );
        assert_eq!(slots.run(10 * MIB, || 7).await, Ok(7));
    }
}
