//! The reader thread: what to read, and when. The only code that takes
//! entries from Redis. It takes no more entries than it has room for: free
//! handler slots, and free places in the consumer's pending list (two per
//! handler, see `inflight`); it reads nothing while outcomes wait for Redis
//! (settle blocked).
//! In order of priority each step:
//! 1. takes the consumer name (refusing to start, exit 2, when a live
//!    process holds it);
//! 2. after every (re)connect, takes back this consumer's own pending
//!    entries that do not run here (XPENDING, then XCLAIM of those only, so
//!    a job still running here gets no extra delivery; the XCLAIM in a
//!    script that checks each is still this consumer's, so an entry another
//!    worker reclaimed meanwhile stays with it);
//! 3. every claim-idle/3, reclaims entries that dead consumers left idle
//!    (XAUTOCLAIM, its cursor kept across rounds so every entry of a long
//!    pending list is reached), the first time one period after each
//!    (re)connect, so that live workers renew first after an outage;
//! 4. reads new entries: a sweep of the streams that may hold more than
//!    their last read returned (on a single Redis each a checked read: the
//!    read and the entries' cancel check in one script call), then one
//!    BLOCK on all of them.
//!
//! The streams are the queues, the node's own stream and the tag streams of
//! the device config (`jobs:v1:tag:{tag}`). The reader looks at the live
//! config's generation before each step (one atomic load) and, when a config
//! job changed the tags, reads the new list from then on: groups created
//! for new streams, per-stream cursors carried over by name. A removed
//! tag's stream is no longer read; its entries running here settle as
//! usual (an entry knows its stream).
//!
//! On a Redis Cluster there is one reader per hash slot of the streams
//! (`run_per_slot`): each reads only its slot's streams, on the node that
//! serves it, so every blocking XREADGROUP names keys of one slot. They
//! share the room: each takes what is free before it reads, and keeps no
//! more than one per stream while it blocks, so a read on one slot never
//! holds capacity that another slot's jobs could use.
//!
//! What becomes of an entry read is `intake`'s business.

use super::entry::{self, RawEntry};
use super::inflight::Room;
use super::intake::Intake;
use super::scripts::{Scripts, TAKE_BACK_OWN};
use super::StreamsState;
use crate::backoff::Outage;
use crate::observe::{alive, metrics::METRICS};
use crate::redis_conn::Conn;
use crate::redis_conn::{self, Fault};
use redis::{RedisResult, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Reader {
    state: Arc<StreamsState>,
    /// On a cluster, the hash slot whose streams this reader reads.
    slot: Option<u16>,
    /// What `/readyz` calls this reader: `redis`, or on a cluster `redis
    /// slot N` (one each, so that one slot's outage is not hidden by
    /// another's recovery).
    part: &'static str,
    intake: Intake,
    conn: Option<Conn>,
    /// The reader's scripts on `conn` (a single Redis only): the batch
    /// script, for the checked start of a job read alone
    /// (`Intake::take_quiet`), and the checked read of a sweep.
    scripts: Option<Scripts>,
    outage: Outage,
    /// What is read: the base streams, then the tag streams.
    streams: Arc<[Arc<str>]>,
    /// The device-config generation `streams` was made from.
    generation: Option<u64>,
    /// Per stream, where taking back own pending entries goes on (`None`
    /// once done); `None` overall when there is nothing to take back.
    own: Option<Vec<Option<String>>>,
    /// Per stream, the XAUTOCLAIM cursor.
    reclaim_cursor: Vec<String>,
    next_reclaim: Instant,
    /// Per stream, whether its last read returned all it asked for (so it
    /// may hold more): only those are swept before the next BLOCK. A stream
    /// that returned less was drained then; the BLOCK returns at once with
    /// whatever came since.
    more: Vec<bool>,
    /// Whether this process ever held its consumer name.
    started: bool,
    lock_warned: bool,
    /// Whether this reader had a connection before (a new one is a reconnect).
    connected_before: bool,
    /// What `/readyz` was last told (`None`: ready).
    told: Option<String>,
}

impl Reader {
    pub fn new(intake: Intake, slot: Option<u16>) -> Self {
        let state = intake.state.clone();
        let generation = state.profile.generation();
        let streams = streams_of(&state, slot);
        let n = streams.len();
        Reader {
            slot,
            part: slot.map_or("redis", ready_part),
            generation: Some(generation),
            streams: streams.into(),
            state,
            intake,
            conn: None,
            scripts: None,
            outage: Outage::new("reader", "Redis", Duration::from_secs(30)),
            own: None,
            reclaim_cursor: vec!["0-0".into(); n],
            next_reclaim: Instant::now(),
            more: vec![true; n],
            started: false,
            lock_warned: false,
            connected_before: false,
            told: Some(String::new()),
        }
    }

    pub fn run(mut self) {
        let slots = self.state.slots.clone();
        // Its longest legitimate turn: a connect, a BLOCK read, taking the
        // consumer name (up to claim-idle), the outage backoff (30s).
        let bound = {
            let s = &self.state.settings;
            s.block + s.redis_timeout * 4 + s.claim_idle * 2 + Duration::from_secs(60)
        };
        let beat = alive::Beat::new("reader", bound);
        self.tell(Some("not connected to Redis yet".into()));
        while !self.state.stopping() {
            beat.tick();
            if self.slot.is_some() && self.streams.is_empty() {
                break; // the device config no longer names a stream here
            }
            if self.state.settle_blocked.load(Ordering::SeqCst) {
                // Outcomes wait for Redis: take nothing new until they land.
                self.state.sleep(Duration::from_millis(50));
                continue;
            }
            let mut free = self.state.inflight.room(&slots, Duration::from_millis(250));
            if free.is_empty() || self.state.stopping() {
                continue;
            }
            match self.step(&mut free) {
                Ok(()) if self.state.lock_lost.load(Ordering::SeqCst) => self.tell(Some(
                    "the consumer name is held by another live worker".into(),
                )),
                Ok(()) => self.tell(None),
                Err(e) => {
                    self.tell(Some(format!("Redis: {} ({e})", redis_conn::describe(&e))));
                    let wait = self.failed(&e);
                    self.state.sleep(wait);
                }
            }
        }
        alive::clear_ready(self.part);
        log::debug!("reader stopped");
    }

    /// Tell `/readyz` whether this reader can take jobs (only changes).
    fn tell(&mut self, why_not: Option<String>) {
        if self.told != why_not {
            alive::set_ready(self.part, why_not.clone());
            self.told = why_not;
        }
    }

    /// A failed step: what the error means decides the wait.
    fn failed(&mut self, e: &redis::RedisError) -> Duration {
        let fault = redis_conn::fault(e);
        match fault {
            Fault::Reconnect | Fault::Full | Fault::Denied => {
                if fault == Fault::Reconnect {
                    self.conn = None;
                }
                self.outage.failed_as(redis_conn::describe(e), e)
            }
            Fault::NoGroup => {
                log::warn!(
                    "a consumer group '{}' is gone (stream or group deleted under this worker: {e}); creating it again",
                    self.state.settings.group
                );
                self.conn = None;
                Duration::from_millis(100)
            }
            Fault::NoScript => {
                log::warn!(
                    "Redis no longer has this worker's scripts (its script cache was flushed: \
                     SCRIPT FLUSH, or a restart); loading them again"
                );
                self.conn = None;
                Duration::from_millis(200)
            }
            Fault::Refused => {
                log::warn!("reading jobs failed: {e}");
                self.conn = None;
                Duration::from_millis(200)
            }
        }
    }

    fn step(&mut self, free: &mut Vec<Room>) -> RedisResult<()> {
        if self.conn.is_none() {
            self.refresh_streams(None)?;
            let mut conn = self.open()?;
            self.scripts = match conn.is_cluster() {
                true => None,
                false => Some(Scripts::load_for_reader(&mut conn)?),
            };
            self.conn = Some(conn);
            if std::mem::replace(&mut self.connected_before, true) {
                METRICS.redis_reconnected();
            }
            if self.state.stopping() {
                return Ok(()); // the connect outlasted a stop: read nothing
            }
            self.outage.recovered();
            // After an outage every entry looks idle for as long as Redis
            // was away (a restart counts its downtime): reclaim only after
            // one renewal period, so that live workers cut off by the same
            // outage renew their leases first (they do at reconnect).
            let every = (self.state.settings.claim_idle / 3).max(Duration::from_millis(10));
            self.next_reclaim = Instant::now() + every;
            // A read cut off by the outage may have delivered entries to this
            // consumer that nobody runs: take back own pending entries first.
            self.own = Some(vec![Some("-".into()); self.streams.len()]);
            self.state.lock_lost.store(true, Ordering::SeqCst);
        }
        let mut conn = self.conn.take().expect("connection just opened");
        let result = if let Err(e) = self.refresh_streams(Some(&mut conn)) {
            Err(e)
        } else if self.state.lock_lost.load(Ordering::SeqCst) {
            self.take_name(&mut conn)
        } else if self.own.is_some() {
            self.take_back_own(&mut conn, free)
        } else if Instant::now() >= self.next_reclaim {
            let every = (self.state.settings.claim_idle / 3).max(Duration::from_millis(10));
            self.next_reclaim = Instant::now() + every;
            self.reclaim(&mut conn, free)
        } else {
            self.read_new(&mut conn, free)
        };
        self.conn = Some(conn);
        result
    }

    fn open(&self) -> RedisResult<Conn> {
        let s = &self.state.settings;
        let mut conn =
            redis_conn::connect(&s.redis_url, s.redis_timeout, s.block + s.redis_timeout)?;
        for stream in self.streams.iter() {
            create_group(&mut conn, stream, &s.group)?;
        }
        let id: u64 = conn.query_at_slot(&redis::cmd("CLIENT").arg("ID").clone(), self.slot)?;
        self.state.set_reader_client(self.slot, id);
        Ok(conn)
    }

    /// When the device config changed since the last look: read its tag
    /// streams from now on. With a connection, groups are created for the
    /// new streams first (without one, `open` creates them all). Per-stream
    /// cursors are kept by name; a new stream starts its own take-back (an
    /// earlier run may have left entries pending there for this consumer).
    fn refresh_streams(&mut self, conn: Option<&mut Conn>) -> RedisResult<()> {
        let generation = self.state.profile.generation();
        if self.generation == Some(generation) {
            return Ok(());
        }
        let list = streams_of(&self.state, self.slot);
        let added: Vec<Arc<str>> = list
            .iter()
            .filter(|s| !self.streams.contains(s))
            .cloned()
            .collect();
        if let Some(conn) = conn {
            for stream in &added {
                create_group(conn, stream, &self.state.settings.group)?;
            }
        }
        let old = std::mem::replace(&mut self.streams, list.into());
        let at = |s: &Arc<str>| old.iter().position(|o| o == s);
        self.more = self
            .streams
            .iter()
            .map(|s| at(s).map_or(true, |i| self.more[i]))
            .collect();
        self.reclaim_cursor = self
            .streams
            .iter()
            .map(|s| at(s).map_or_else(|| "0-0".into(), |i| self.reclaim_cursor[i].clone()))
            .collect();
        let own = self.own.take();
        if own.is_some() || !added.is_empty() {
            self.own = Some(
                self.streams
                    .iter()
                    .map(|s| match (at(s), &own) {
                        (Some(i), Some(own)) => own[i].clone(),
                        (Some(_), None) => None,
                        (None, _) => Some("-".into()),
                    })
                    .collect(),
            );
        }
        if *old != *self.streams {
            log::info!(
                "the device config's tags changed: reading streams {:?}",
                self.streams
            );
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// Take (or take again, after a reconnect) the consumer name. The first
    /// time, a name held by a live process stops this one: two live
    /// processes must never read as one consumer.
    fn take_name(&mut self, conn: &mut Conn) -> RedisResult<()> {
        let st = self.state.clone();
        let keys = st.lock.keys(&self.streams);
        if !self.started {
            match st
                .lock
                .take_at_start(conn, &keys, &|d| st.stop_reading.sleep(d))?
            {
                Ok(()) => {
                    self.started = true;
                    st.lock_lost.store(false, Ordering::SeqCst);
                }
                Err(_) if st.stopping() => {}
                Err(holder) => {
                    crate::worker::lifecycle::stop_with_error(format!(
                        "consumer name '{}' is in use by a live worker ({holder}); give each \
                         worker its own name with --consumer (or --node-name)",
                        st.consumer
                    ));
                    st.stop_reading.set();
                }
            }
            return Ok(());
        }
        match st.lock.hold(conn, &keys)? {
            Ok(()) => {
                if self.lock_warned {
                    log::info!("consumer name '{}' is ours again; reading", st.consumer);
                }
                self.lock_warned = false;
                st.lock_lost.store(false, Ordering::SeqCst);
            }
            Err(holder) => {
                if !self.lock_warned {
                    log::error!(
                        "consumer name '{}' is in use by another live worker ({}); not reading \
                         until it stops. Give each worker its own --consumer/--node-name.",
                        st.consumer,
                        holder.name
                    );
                }
                self.lock_warned = true;
                st.sleep(Duration::from_millis(500));
            }
        }
        Ok(())
    }

    /// This consumer's own pending entries that do not run here: what an
    /// earlier run of it left unfinished, or what a read cut off by an
    /// outage delivered. Goes on, stream by stream, until every one was
    /// taken back (more room may be needed than there is now).
    fn take_back_own(&mut self, conn: &mut Conn, free: &mut Vec<Room>) -> RedisResult<()> {
        let mut cursors = self.own.take().unwrap_or_default();
        for i in 0..cursors.len() {
            if free.is_empty() {
                break;
            }
            let Some(start) = cursors[i].take() else {
                continue;
            };
            match self.take_back_stream(conn, i, &start, free) {
                Ok(next) => cursors[i] = next,
                Err(e) => {
                    cursors[i] = Some(start);
                    self.own = Some(cursors);
                    return Err(e);
                }
            }
        }
        if cursors.iter().any(Option::is_some) {
            self.own = Some(cursors);
        }
        Ok(())
    }

    /// One page of own pending entries of stream `i` from `start`: XPENDING,
    /// then XCLAIM of those not running here (one delivery counted each:
    /// they are delivered again); an entry acknowledged or reclaimed by
    /// another worker meanwhile is simply not returned (`TAKE_BACK_OWN`). Returns where to go on, `None` when done.
    fn take_back_stream(
        &mut self,
        conn: &mut Conn,
        i: usize,
        start: &str,
        free: &mut Vec<Room>,
    ) -> RedisResult<Option<String>> {
        let st = self.state.clone();
        let stream = &self.streams[i].clone();
        let page = free.len() + st.inflight.len() + 16;
        let rows = pending_rows(conn, &st, stream, (start, "+"), page)?;
        let candidates: Vec<&(String, u64)> = rows
            .iter()
            .filter(|(id, _)| !st.inflight.contains(stream, id))
            .collect();
        let mine = &candidates[..candidates.len().min(free.len())];
        let after = |id: &str| Some(format!("({id}"));
        let next = match (mine.last(), rows.last()) {
            // More to take back than room: resume after the last taken.
            (Some((id, _)), _) if mine.len() < candidates.len() => after(id),
            // A full page: there may be more rows after it.
            (_, Some((id, _))) if rows.len() >= page => after(id),
            _ => None,
        };
        if mine.is_empty() {
            return Ok(next);
        }
        let counts: HashMap<&str, u64> = mine.iter().map(|(id, n)| (id.as_str(), *n)).collect();
        // One script: only those still pending for this consumer (see
        // TAKE_BACK_OWN: another worker may have reclaimed one meanwhile).
        let mut claim = redis::cmd("EVAL");
        claim
            .arg(TAKE_BACK_OWN)
            .arg(1)
            .arg(&**stream)
            .arg(&st.settings.group)
            .arg(&st.consumer);
        for (id, _) in mine {
            claim.arg(id);
        }
        let raws = entry::parse_entries(claim.query(conn)?).map_err(parse_error)?;
        let with_counts = raws
            .into_iter()
            .map(|r| {
                let n = counts.get(r.id.as_str()).copied().unwrap_or(0) + 1;
                (r, n)
            })
            .collect();
        let taken = self.intake.take(conn, stream, with_counts, free);
        if taken.held > 0 {
            log::info!(
                "resuming {} of this consumer's own pending entries on {stream}",
                taken.held
            );
        }
        Ok(next)
    }

    /// XAUTOCLAIM entries idle longer than claim-idle, up to the free room.
    fn reclaim(&mut self, conn: &mut Conn, free: &mut Vec<Room>) -> RedisResult<()> {
        let st = self.state.clone();
        let streams = self.streams.clone();
        for (i, stream) in streams.iter().enumerate() {
            for _ in 0..16 {
                if free.is_empty() {
                    return Ok(());
                }
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&**stream)
                    .arg(&st.settings.group)
                    .arg(&st.consumer)
                    .arg(st.settings.claim_idle.as_millis() as u64)
                    .arg(&self.reclaim_cursor[i])
                    .arg("COUNT")
                    .arg(free.len())
                    .query(conn)?;
                let Value::Array(mut parts) = reply else {
                    break;
                };
                if parts.len() < 2 {
                    break;
                }
                let raws = entry::parse_entries(parts.swap_remove(1)).map_err(parse_error)?;
                self.reclaim_cursor[i] = entry::text(parts.swap_remove(0)).map_err(parse_error)?;
                // An entry that runs here was idle because renewals failed:
                // it is still ours to finish.
                let raws: Vec<RawEntry> = raws
                    .into_iter()
                    .filter(|r| !st.inflight.contains(stream, &r.id))
                    .collect();
                if !raws.is_empty() {
                    let counts = delivery_counts(conn, &st, stream, &raws)?;
                    let with_counts = raws
                        .into_iter()
                        .filter_map(|r| counts.get(&r.id).map(|n| (r, *n)))
                        .collect();
                    let taken = self.intake.take(conn, stream, with_counts, free);
                    for kind in &taken.kinds {
                        METRICS.reclaimed(kind);
                    }
                    if taken.held > 0 {
                        st.counters.reclaimed(taken.held as u64);
                        log::info!(
                            "reclaimed {} entries idle over claim-idle on {stream}",
                            taken.held
                        );
                    }
                }
                if self.reclaim_cursor[i] == "0-0" {
                    break;
                }
            }
        }
        Ok(())
    }

    /// New entries. First a sweep without BLOCK of the streams that may
    /// hold more (see `more`), each asked for the room still free; then one
    /// BLOCK on every stream, each asked for its share of the room (at least
    /// one). An idle worker, or one whose jobs come one at a time, so sends
    /// one read per entry or per BLOCK. With room for fewer entries than
    /// streams, that read can return more entries than there is room for:
    /// the extra ones stay pending for this consumer and are taken back as
    /// soon as room frees.
    fn read_new(&mut self, conn: &mut Conn, free: &mut Vec<Room>) -> RedisResult<()> {
        let st = self.state.clone();
        let streams = self.streams.clone();
        let before = free.len();
        for (i, stream) in streams.iter().enumerate() {
            if !self.more[i] {
                continue;
            }
            if free.is_empty() {
                return Ok(());
            }
            let asked = free.len();
            if let Some(scripts) = &self.scripts {
                // The pre-start cancel check in the read's round trip.
                let reply = scripts.checked_read(&st, stream, asked).query(conn)?;
                let (raws, cancelled) = entry::parse_checked_read(reply).map_err(parse_error)?;
                self.more[i] = raws.len() >= asked;
                self.intake.take_checked(stream, raws, cancelled, free);
                continue;
            }
            let reply = xreadgroup(conn, &st, asked, None, &[stream])?;
            self.more[i] = gave_all(&reply, stream, asked);
            for (_, raws) in reply {
                let fresh = raws.into_iter().map(|r| (r, 1)).collect();
                self.intake.take(conn, stream, fresh, free);
            }
        }
        if free.len() < before || st.stopping() {
            return Ok(());
        }
        let until_reclaim = self.next_reclaim.saturating_duration_since(Instant::now());
        let block = st
            .settings
            .block
            .min(until_reclaim)
            .max(Duration::from_millis(1));
        if self.slot.is_some() {
            // Readers of other slots may need the rest meanwhile.
            free.truncate(streams.len());
        }
        let all: Vec<&Arc<str>> = streams.iter().collect();
        let share = (free.len() / streams.len().max(1)).max(1);
        let reply = xreadgroup(conn, &st, share, Some(block), &all)?;
        // A stream that gave all it was asked may hold more, unless that
        // was one entry: a job alone is what a quiet queue brings, and
        // should more have come, the next BLOCK returns them at once.
        for (i, stream) in streams.iter().enumerate() {
            self.more[i] = gave_all(&reply, stream, share.max(2));
        }
        let lone = reply.iter().map(|(_, raws)| raws.len()).sum::<usize>() == 1;
        let scripts = self.scripts.as_ref().filter(|_| lone);
        let mut result = Ok(());
        for (name, raws) in reply {
            if let Some(stream) = streams.iter().find(|s| ***s == *name) {
                let fresh = raws.into_iter().map(|r| (r, 1)).collect();
                let left = match self.intake.take_quiet(conn, scripts, stream, fresh, free) {
                    Ok(taken) => taken.left_pending > 0,
                    Err(e) => {
                        result = Err(e);
                        true
                    }
                };
                if left {
                    self.own = Some(vec![Some("-".into()); streams.len()]);
                }
            }
        }
        result
    }
}

/// `/readyz`'s name for the reader of `slot`: one small string per slot
/// ever read, kept for the process's life.
fn ready_part(slot: u16) -> &'static str {
    static PARTS: std::sync::Mutex<BTreeMap<u16, &'static str>> =
        std::sync::Mutex::new(BTreeMap::new());
    crate::sync::lock(&PARTS)
        .entry(slot)
        .or_insert_with(|| Box::leak(format!("redis slot {slot}").into_boxed_str()))
}

/// The streams read now, or on a cluster those of `slot`.
fn streams_of(st: &StreamsState, slot: Option<u16>) -> Vec<Arc<str>> {
    let mut list = st.streams_now();
    if let Some(slot) = slot {
        list.retain(|s| crate::redis_cluster::slot(s) == slot);
    }
    list
}

/// On a cluster: a reader for each hash slot of the streams read, started
/// as the device config's tags bring streams in new slots (a reader whose
/// slot has no stream left stops by itself). Returns once every reader
/// stopped.
pub fn run_per_slot(intake: Intake) {
    let st = intake.state.clone();
    let mut readers: HashMap<u16, std::thread::JoinHandle<()>> = HashMap::new();
    let mut generation = None;
    while !st.stopping() {
        let now = st.profile.generation();
        if generation != Some(now) {
            generation = Some(now);
            let mut slots: Vec<u16> = st
                .streams_now()
                .iter()
                .map(|s| crate::redis_cluster::slot(s))
                .collect();
            slots.sort_unstable();
            slots.dedup();
            readers.retain(|_, r| !r.is_finished());
            for slot in slots {
                if readers.contains_key(&slot) {
                    continue;
                }
                let intake = intake.clone();
                let r = std::thread::Builder::new()
                    .name(format!("reader-{slot}"))
                    .spawn(move || Reader::new(intake, Some(slot)).run())
                    .expect("spawn reader");
                readers.insert(slot, r);
            }
        }
        st.sleep(Duration::from_millis(250));
    }
    for (_, r) in readers {
        let _ = r.join();
    }
}

/// Whether a read's `reply` brought `stream` at least `asked` entries.
fn gave_all(reply: &[(String, Vec<RawEntry>)], stream: &str, asked: usize) -> bool {
    reply
        .iter()
        .any(|(name, raws)| name == stream && raws.len() >= asked)
}

/// `XGROUP CREATE stream group 0 MKSTREAM`; an existing group is fine.
fn create_group(conn: &mut Conn, stream: &str, group: &str) -> RedisResult<()> {
    let created: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn);
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e),
        _ => Ok(()),
    }
}

fn xreadgroup(
    conn: &mut Conn,
    st: &StreamsState,
    count: usize,
    block: Option<Duration>,
    streams: &[&Arc<str>],
) -> RedisResult<Vec<(String, Vec<RawEntry>)>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&st.settings.group)
        .arg(&st.consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(b) = block {
        cmd.arg("BLOCK").arg(b.as_millis() as u64);
    }
    cmd.arg("STREAMS");
    for s in streams {
        cmd.arg(&***s);
    }
    for _ in streams {
        cmd.arg(">");
    }
    entry::parse_read_reply(cmd.query(conn)?).map_err(parse_error)
}

/// `XPENDING stream group start end count <this consumer>`: (id, delivery
/// count) of each row.
fn pending_rows(
    conn: &mut Conn,
    st: &StreamsState,
    stream: &str,
    (start, end): (&str, &str),
    count: usize,
) -> RedisResult<Vec<(String, u64)>> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(&st.settings.group)
        .arg(start)
        .arg(end)
        .arg(count)
        .arg(&st.consumer)
        .query(conn)?;
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    Ok(items
        .into_iter()
        .filter_map(|row| match row {
            Value::Array(cols) => match (cols.first(), cols.get(3)) {
                (Some(Value::BulkString(id)), Some(Value::Int(n))) => {
                    Some((String::from_utf8_lossy(id).into_owned(), *n as u64))
                }
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Redis's delivery counts of `raws`, from this consumer's pending list.
fn delivery_counts(
    conn: &mut Conn,
    st: &StreamsState,
    stream: &Arc<str>,
    raws: &[RawEntry],
) -> RedisResult<HashMap<String, u64>> {
    let (first, last) = (&raws[0].id, &raws[raws.len() - 1].id);
    let n = raws.len() + st.inflight.len() + 16;
    Ok(pending_rows(conn, st, stream, (first, last), n)?
        .into_iter()
        .collect())
}

fn parse_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply", msg))
}
