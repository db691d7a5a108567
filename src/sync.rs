//! The one mutex helper. A poisoned lock only means another thread panicked
//! while holding it; the data behind every lock in this crate stays
//! consistent across a panic, so keep going rather than spread the panic.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
