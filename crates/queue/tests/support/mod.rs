//! What the queue's integration tests share.

use std::future::Future;

/// Runs `cleanup` to the end on a thread with a runtime of its own: a test
/// guard's `Drop` may run while a failed assertion unwinds inside a tokio
/// runtime, where blocking on another future would panic. Best effort: a
/// cleanup that fails leaves a queue behind, never a second panic.
pub fn clean_up_on_own_runtime<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(cleanup());
    })
    .join();
}
