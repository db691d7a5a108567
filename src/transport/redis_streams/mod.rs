//! Redis Streams transport (`citadel work`, PROTOCOL.md §1–2).
//!
//! Threads: one reader (XREADGROUP, reclaim), the handler pool, one settle
//! thread (events, status, dead letters, XACK, lease renewal, cancel checks),
//! and the main thread, which waits for a signal and runs the shutdown:
//! stop reading at once (CLIENT UNBLOCK ends a blocked read), let in-flight
//! jobs finish for the grace period, settle them, and exit. Jobs still running
//! after the grace period (or a second signal) are cancelled and left pending,
//! so another worker reclaims them.

mod consumer_lock;
pub mod dead_letter;
pub mod entry;
mod inflight;
mod reader;
mod settler;

use crate::config::Settings;
use crate::events::NodeFacts;
use crate::redis_conn;
use crate::worker::cancel::{lock, CancelReason};
use crate::worker::exec::Executor;
use crate::worker::pool;
use crate::worker::queue::SettleQueue;
use crossbeam_channel::{Receiver, Sender};
use inflight::InFlight;
use settler::Msg;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// State the reader, the job threads and the settle thread share.
pub struct Shared {
    pub settings: Settings,
    pub consumer: String,
    pub streams: Vec<Arc<str>>,
    pub node: NodeFacts,
    inflight: InFlight,
    queue: SettleQueue<Msg>,
    stop_reading: AtomicBool,
    stop_settling: AtomicBool,
    hard_stop: Mutex<Option<Instant>>,
    /// The reader's CLIENT ID, so a shutdown can unblock its XREADGROUP.
    reader_client: AtomicU64,
    /// This process's claim on its consumer name, and whether the reader must
    /// (re)take it before reading.
    lock: consumer_lock::ConsumerLock,
    lock_lost: AtomicBool,
    /// Dropped on shutdown: wakes every interruptible sleep.
    wake: Mutex<Option<Sender<()>>>,
    woken: Receiver<()>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop_reading.load(Ordering::SeqCst)
    }

    /// Sleep that a shutdown interrupts.
    fn sleep(&self, d: Duration) {
        let _ = self.woken.recv_timeout(d);
    }

    fn past_hard_stop(&self) -> bool {
        lock(&self.hard_stop).is_some_and(|t| Instant::now() >= t)
    }
}

/// Run `citadel work` until a signal; Ok when it shut down cleanly.
pub fn run(settings: Settings, exec: Arc<Executor>, signals: Receiver<()>) -> Result<(), String> {
    let (wake_tx, woken) = crossbeam_channel::bounded(0);
    let consumer = settings.consumer().to_owned();
    let streams: Vec<Arc<str>> = settings.streams().into_iter().map(Arc::from).collect();
    let concurrency = settings.concurrency;
    let shared = Arc::new(Shared {
        consumer,
        streams,
        node: exec.node.clone(),
        inflight: InFlight::new(concurrency),
        queue: SettleQueue::new(concurrency * 64),
        stop_reading: AtomicBool::new(false),
        stop_settling: AtomicBool::new(false),
        hard_stop: Mutex::new(None),
        reader_client: AtomicU64::new(0),
        lock: consumer_lock::ConsumerLock::new(
            &settings.group,
            settings.consumer(),
            &crate::config::hostname(),
            settings.claim_idle,
        ),
        lock_lost: AtomicBool::new(true),
        wake: Mutex::new(Some(wake_tx)),
        woken,
        settings,
    });
    log::info!(
        "citadel {} working: streams {:?}, group '{}', consumer '{}', {} handler threads, claim-idle {:?}",
        crate::events::AGENT_VERSION,
        shared.streams,
        shared.settings.group,
        shared.consumer,
        concurrency,
        shared.settings.claim_idle,
    );

    let (task_tx, task_rx) = crossbeam_channel::bounded(concurrency);
    let handlers = pool::start(concurrency, task_rx, exec.clone());
    let settler = spawn("settle", {
        let shared = shared.clone();
        move || settler::Settler::new(shared).run()
    });
    let reader = spawn("reader", {
        let (shared, exec) = (shared.clone(), exec.clone());
        move || reader::Reader::new(shared, exec, task_tx).run()
    });

    let _ = signals.recv();
    let grace = shared.settings.shutdown_grace;
    log::info!(
        "signal received: no new jobs are read; waiting up to {:?} for {} in-flight jobs",
        grace,
        shared.inflight.len()
    );
    shared.stop_reading.store(true, Ordering::SeqCst);
    *lock(&shared.hard_stop) = Some(Instant::now() + grace + Duration::from_secs(5));
    lock(&shared.wake).take();
    shared.inflight.wake();
    unblock_reader(&shared, &reader);
    let _ = reader.join();

    let deadline = Instant::now() + grace;
    let mut forced = false;
    loop {
        if shared
            .inflight
            .wait_empty(deadline.min(Instant::now() + Duration::from_millis(50)))
        {
            break;
        }
        if signals.try_recv().is_ok() || Instant::now() >= deadline {
            forced = true;
            break;
        }
    }
    if forced {
        let left = shared.inflight.snapshot();
        log::warn!(
            "stopping now: cancelling {} unfinished jobs; their entries stay pending and will be reclaimed",
            left.len()
        );
        for e in &left {
            e.token.cancel(CancelReason::Shutdown);
        }
        if !shared
            .inflight
            .wait_empty(Instant::now() + Duration::from_secs(3))
        {
            log::warn!("some handlers did not stop in time; exiting anyway");
        }
    }
    shared.stop_settling.store(true, Ordering::SeqCst);
    let _ = settler.join();
    if !forced {
        for h in handlers {
            let _ = h.join();
        }
    }
    log::info!("stopped");
    Ok(())
}

/// A blocked XREADGROUP would still take a job that arrives after the signal;
/// CLIENT UNBLOCK ends it at once. Repeated until the reader is gone, since
/// the signal may land between two reads.
fn unblock_reader(shared: &Shared, reader: &std::thread::JoinHandle<()>) {
    let s = &shared.settings;
    let until = Instant::now() + s.redis_timeout + Duration::from_secs(1);
    let mut conn = None;
    while !reader.is_finished() && Instant::now() < until {
        let id = shared.reader_client.load(Ordering::SeqCst);
        if id != 0 {
            if conn.is_none() {
                conn = redis_conn::connect(
                    &s.redis_url,
                    Duration::from_secs(1),
                    Duration::from_secs(1),
                )
                .ok();
            }
            if let Some(c) = conn.as_mut() {
                if redis::cmd("CLIENT")
                    .arg("UNBLOCK")
                    .arg(id)
                    .query::<i64>(c)
                    .is_err()
                {
                    conn = None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn thread")
}
