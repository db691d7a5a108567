//! The reporter thread: delivers status reports to Nexus in order, retrying
//! with backoff until each is accepted. A report is in the spool file from
//! the moment the job ends until Nexus accepts it, so neither an outage nor a
//! restart loses it; it is removed right after acceptance, so it is not sent
//! again.

use super::client::{NexusClient, NexusError};
use super::spool::{Report, Spool};
use crate::backoff::Outage;
use crate::sync::lock;
use crate::worker::stop::{Doorbell, StopFlag};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Reporter {
    client: Arc<NexusClient>,
    spool: Mutex<Spool>,
    bell: Doorbell,
    stop: StopFlag,
    give_up_at: Mutex<Option<Instant>>,
    retry_cap: Duration,
}

impl Reporter {
    pub fn start(
        client: Arc<NexusClient>,
        spool: Spool,
        retry_cap: Duration,
    ) -> (Arc<Reporter>, JoinHandle<()>) {
        let r = Arc::new(Reporter {
            client,
            spool: Mutex::new(spool),
            bell: Doorbell::default(),
            stop: StopFlag::default(),
            give_up_at: Mutex::new(None),
            retry_cap,
        });
        let thread = std::thread::Builder::new()
            .name("nexus-report".into())
            .spawn({
                let r = r.clone();
                move || r.run()
            })
            .expect("spawn reporter thread");
        (r, thread)
    }

    pub fn submit(&self, report: Report) {
        lock(&self.spool).push(report);
        self.bell.ring();
    }

    /// Deliver what is left until `deadline`, then stop (the rest stays in
    /// the spool for the next run).
    pub fn finish(&self, deadline: Instant) {
        *lock(&self.give_up_at) = Some(deadline);
        self.stop.set();
        self.bell.ring();
    }

    fn run(&self) {
        let mut outage = Outage::new("report", "Nexus", self.retry_cap);
        loop {
            let next = lock(&self.spool).front().cloned();
            let Some(r) = next else {
                if self.stop.is_set() {
                    return;
                }
                self.bell.wait(Duration::from_secs(1));
                continue;
            };
            let wait = match self.client.report(&r.id, &r.status, &r.output) {
                Ok(()) => {
                    outage.recovered();
                    lock(&self.spool).remove(&r.id);
                    log::info!("reported job {} to Nexus: {}", r.id, r.status);
                    continue;
                }
                Err(NexusError::Rejected(code, body)) => {
                    log::error!(
                        "Nexus rejected the report of job {} (HTTP {code}: {body}); dropping it",
                        r.id
                    );
                    lock(&self.spool).remove(&r.id);
                    continue;
                }
                Err(
                    e @ NexusError::Busy {
                        retry_after: Some(d),
                        ..
                    },
                ) => {
                    outage.failed(&e);
                    d
                }
                Err(e) => outage.failed(&e),
            };
            if lock(&self.give_up_at).is_some_and(|t| Instant::now() + wait >= t) {
                log::warn!("stopping with status reports undelivered; they stay in the spool for the next run");
                return;
            }
            std::thread::sleep(wait);
        }
    }
}
