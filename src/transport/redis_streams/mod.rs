//! Redis Streams transport (`citadel work`, PROTOCOL.md §1–2).
//!
//! Threads: one reader (what to read: XREADGROUP, take-back, reclaim) whose
//! entries `intake` classifies and hands to the shared handler pool, and
//! one settle thread (events, status, dead letters and XACK through
//! `scripts`, lease and consumer-name renewal, cancel checks). Stopping
//! reads is immediate (CLIENT UNBLOCK ends a blocked read); jobs abandoned
//! at shutdown are not settled, so their entries stay pending and another
//! worker reclaims them.

mod consumer_lock;
pub mod dead_letter;
pub mod entry;
mod inflight;
mod intake;
mod reader;
mod scripts;
mod settle_cluster;
mod settler;

use crate::config::Settings;
use crate::node::profile::LiveProfile;
use crate::redis_conn;
use crate::sync::lock;
use crate::worker::cancel::CancelReason;
use crate::worker::counters::Counters;
use crate::worker::exec::Executor;
use crate::worker::lifecycle::Transport;
use crate::worker::pool::TaskSender;
use crate::worker::queue::SettleQueue;
use crate::worker::slots::Slots;
use crate::worker::stop::StopFlag;
use inflight::InFlight;
use settler::Msg;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// State the reader, the job threads and the settle thread share.
pub struct StreamsState {
    pub settings: Settings,
    pub consumer: String,
    /// The queues and the node's own stream; the reader adds the device
    /// config's tag streams (which change while it runs).
    pub base_streams: Vec<Arc<str>>,
    /// The device config: event meta and tags, read live.
    pub profile: Arc<LiveProfile>,
    /// The executor's counters: dead letters Redis took, entries reclaimed.
    pub counters: Arc<Counters>,
    slots: Arc<Slots>,
    inflight: InFlight,
    queue: SettleQueue<Msg>,
    /// Set to stop the reader; also wakes its backoff sleeps.
    stop_reading: StopFlag,
    stop_settling: AtomicBool,
    hard_stop: Mutex<Option<Instant>>,
    /// Each reader's CLIENT ID (with the slot of its streams, on a
    /// cluster), so a shutdown can unblock its XREADGROUP.
    reader_clients: Mutex<Vec<(Option<u16>, u64)>>,
    /// This process's claim on its consumer name, and whether the reader must
    /// (re)take it before reading.
    lock: consumer_lock::ConsumerLock,
    lock_lost: AtomicBool,
    /// Outcomes wait because Redis cannot take them now: the reader takes
    /// nothing new, and chunk events are dropped rather than queued.
    settle_blocked: AtomicBool,
    /// Chunk events dropped while settling was blocked.
    dropped_chunks: AtomicU64,
}

impl StreamsState {
    /// The base streams, then the device config's tag streams (repeats
    /// dropped).
    fn streams_now(&self) -> Vec<Arc<str>> {
        let mut list = self.base_streams.clone();
        for t in self.profile.now().tag_streams.iter() {
            if !list.contains(t) {
                list.push(t.clone());
            }
        }
        list
    }

    /// The keys of this process's claim on its consumer name for every
    /// stream read now.
    fn lock_keys(&self) -> Vec<String> {
        self.lock.keys(&self.streams_now())
    }

    /// Record the CLIENT ID of the reader of `slot` (`None`: the reader).
    fn set_reader_client(&self, slot: Option<u16>, id: u64) {
        let mut clients = lock(&self.reader_clients);
        clients.retain(|(s, _)| *s != slot);
        clients.push((slot, id));
    }

    fn stopping(&self) -> bool {
        self.stop_reading.is_set()
    }

    /// Sleep that a stop interrupts.
    fn sleep(&self, d: Duration) {
        self.stop_reading.sleep(d);
    }

    fn past_hard_stop(&self) -> bool {
        lock(&self.hard_stop).is_some_and(|t| Instant::now() >= t)
    }
}

/// The running Redis Streams transport: a reader thread and a settle thread
/// feeding and settling the shared handler pool.
pub struct RedisStreams {
    shared: Arc<StreamsState>,
    exec: Arc<Executor>,
    tasks: TaskSender,
    reader: Option<JoinHandle<()>>,
    settler: Option<JoinHandle<()>>,
}

impl RedisStreams {
    pub fn start(
        settings: Settings,
        exec: Arc<Executor>,
        tasks: TaskSender,
        slots: Arc<Slots>,
    ) -> Self {
        let cluster = settings.on_cluster();
        let shared = Arc::new(StreamsState {
            consumer: settings.consumer().to_owned(),
            base_streams: settings.streams().into_iter().map(Arc::from).collect(),
            profile: exec.profile.clone(),
            counters: exec.counters.clone(),
            inflight: InFlight::new(slots.capacity()),
            queue: SettleQueue::new(slots.capacity() * 64),
            slots,
            stop_reading: StopFlag::default(),
            stop_settling: AtomicBool::new(false),
            hard_stop: Mutex::new(None),
            reader_clients: Mutex::new(Vec::new()),
            lock: consumer_lock::ConsumerLock::new(
                &settings.group,
                settings.consumer(),
                &crate::config::hostname(),
                settings.claim_idle,
                cluster,
            ),
            lock_lost: AtomicBool::new(true),
            settle_blocked: AtomicBool::new(false),
            dropped_chunks: AtomicU64::new(0),
            settings,
        });
        log::info!(
            "working: streams {:?}, group '{}', consumer '{}', claim-idle {:?}",
            shared.base_streams,
            shared.settings.group,
            shared.consumer,
            shared.settings.claim_idle,
        );
        if shared.settings.tag_streams {
            let tags = shared.profile.now().tag_streams.clone();
            log::info!("tag streams (the device config's tags, followed live): {tags:?}");
        } else {
            log::info!("tag streams: off (--tag-streams=false)");
        }
        let settler = spawn("settle", {
            let shared = shared.clone();
            move || settler::Settler::new(shared).run()
        });
        let mut me = RedisStreams {
            shared,
            exec,
            tasks,
            reader: None,
            settler: Some(settler),
        };
        me.resume_reading();
        me
    }

    /// Start (again) taking entries; the settle thread never stopped.
    pub fn resume_reading(&mut self) {
        if let Some(old) = self.reader.take() {
            if !self.shared.stop_reading.is_set() {
                self.reader = Some(old); // reading already
                return;
            }
            // A reader told to stop that was still waiting for Redis.
            let _ = old.join();
        }
        self.shared.stop_reading.clear();
        let (shared, exec, tasks) = (self.shared.clone(), self.exec.clone(), self.tasks.clone());
        let intake = intake::Intake {
            state: shared,
            exec,
            tasks,
        };
        // On a cluster: one reader per hash slot (see `reader`).
        self.reader = Some(if intake.state.settings.on_cluster() {
            spawn("readers", move || reader::run_per_slot(intake))
        } else {
            spawn("reader", move || reader::Reader::new(intake, None).run())
        });
    }
}

impl Transport for RedisStreams {
    /// Returns within about half a second even when Redis hangs: a reader
    /// still waiting for Redis then is left to notice the stop by itself;
    /// whatever a read returns after the stop stays pending (see `intake`),
    /// so no job starts after it.
    fn stop_reading(&mut self) {
        let again = self.shared.stop_reading.is_set();
        self.shared.stop_reading.set();
        self.shared.slots.wake();
        self.shared.inflight.wake();
        if let Some(reader) = self.reader.take() {
            if !again {
                unblock_reader(&self.shared, &reader);
            }
            if reader.is_finished() {
                let _ = reader.join();
            } else {
                log::debug!("the reader is still waiting for Redis; not waiting for it");
                self.reader = Some(reader);
            }
        }
    }

    fn abandon(&self) {
        for e in self.shared.inflight.snapshot() {
            e.token.cancel(CancelReason::Shutdown);
        }
    }

    /// Returns by `hard_deadline` even if a Redis call of the settle thread
    /// hangs: what it had not settled stays pending in Redis.
    fn finish(mut self: Box<Self>, hard_deadline: Instant) {
        // stop_reading() came first; a reader still waiting for Redis then
        // is not waited for again.
        self.shared.stop_reading.set();
        if let Some(reader) = self.reader.take() {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        *lock(&self.shared.hard_stop) = Some(hard_deadline);
        self.shared.stop_settling.store(true, Ordering::SeqCst);
        if let Some(settler) = self.settler.take() {
            while !settler.is_finished() && Instant::now() < hard_deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if settler.is_finished() {
                let _ = settler.join();
            } else {
                log::warn!("Redis did not answer the last settle in time; exiting without it");
            }
        }
    }
}

/// A blocked XREADGROUP would still take a job that arrives after the signal;
/// CLIENT UNBLOCK ends it at once. Repeated until the reader is gone, since
/// the signal may land between two reads.
/// On a cluster, each reader's on the node of its slot.
fn unblock_reader(shared: &StreamsState, reader: &JoinHandle<()>) {
    let s = &shared.settings;
    let until = Instant::now() + Duration::from_millis(500);
    let mut conn = None;
    while !reader.is_finished() && Instant::now() < until {
        let clients = lock(&shared.reader_clients).clone();
        for (slot, id) in clients {
            if conn.is_none() {
                let left = until.saturating_duration_since(Instant::now());
                let t = left.clamp(Duration::from_millis(1), Duration::from_millis(200));
                conn = redis_conn::connect(&s.redis_url, t, t).ok();
            }
            if let Some(c) = conn.as_mut() {
                let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(id).clone();
                if c.query_at_slot::<i64>(&unblock, slot).is_err() {
                    conn = None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn thread")
}
