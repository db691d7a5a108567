//! A real Redis Cluster for tests: `masters × (1 + replicas_per_master)`
//! `redis-server --cluster-enabled yes` processes joined by
//! `redis-cli --cluster create`, each on free loopback ports in its own
//! directory (nodes.conf, AOF, log). Both the client port and the cluster-bus
//! port are picked free (`--cluster-port`): the default bus port, port +
//! 10000, is past 65535 for most ephemeral ports. Node timeout 1.5 s, so a
//! failover takes a few seconds.
//!
//! It also does to a live cluster what an operator does: SIGKILL a master and
//! wait for its replica to take over, restart a node, reshard one slot (all
//! of it, or half, so that clients meet ASK redirects).
//!
//! Every wait has a deadline and panics with the nodes' log tails; nothing
//! sleeps as synchronisation. Dropping it kills every process by its pid.
//! It never touches citadel code: tests drive it with the `redis` crate.
//!
//! Limits: no password or TLS (the harness's own connections and redis-cli
//! use neither, so `extra_args` must not add `requirepass` or TLS-only
//! ports); at least 3 masters; a replica's full sync starts at once and
//! replicas are pinged every second (so `CLUSTER SLOTS` lists them quickly).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::Value;

use super::{free_port, fresh_temp_dir, open_log, read_log, tail};

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How long a node may take to answer PING after a (re)start (AOF load
/// included) on a loaded machine.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `redis-cli --cluster create` may run.
const CREATE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the nodes may take to agree after a create, a restart or a
/// resharding step.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the cluster waits poll. Each poll asks every node several
/// commands, so this is slower than `support::POLL`: on a 2-core machine a
/// 10 ms poll of six nodes would compete with the cluster it waits for.
const CLUSTER_POLL: Duration = Duration::from_millis(50);

/// Keys asked per `CLUSTER GETKEYSINSLOT` page and moved per MIGRATE.
const MIGRATE_PAGE: usize = 100;

/// Connect/read/write timeout of the connections handed to tests.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// The shape of a cluster to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// At least 3 (`redis-cli --cluster create` refuses fewer).
    pub masters: usize,
    pub replicas_per_master: usize,
    /// Appended to every node's command line at every (re)start: a later
    /// option replaces a default one.
    pub extra_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            masters: 3,
            replicas_per_master: 0,
            extra_args: Vec::new(),
        }
    }
}

/// One slot range as `CLUSTER SLOTS` names it, by ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SlotRange {
    start: u16,
    end: u16,
    master: u16,
    /// Sorted.
    replicas: Vec<u16>,
}

/// A node's whole `CLUSTER SLOTS` answer, sorted by range.
type SlotMap = Vec<SlotRange>;

/// What a wait needs to know of a node: where it listens and logs.
#[derive(Clone, Debug)]
struct Peer {
    port: u16,
    log: PathBuf,
}

/// One redis-server process of the cluster.
struct Node {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Spawns redis-server on the node's ports and dir and waits until it
    /// answers PING. On failure the process is reaped and `child` is `None`.
    fn spawn(&mut self, extra_args: &[String]) -> Result<(), String> {
        let log = open_log(&self.log);
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--cluster-port")
            .arg(self.bus_port.to_string())
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(self.dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", "1500"])
            .args(["--cluster-announce-ip", "127.0.0.1"])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            // A replica's full sync starts at once, not 5 s later (the
            // default waits for more replicas to share one transfer).
            .args(["--repl-diskless-sync-delay", "0"])
            // CLUSTER SLOTS lists a replica only once its replication offset
            // is non-zero; on an idle master that is the first replication
            // ping (every 10 s by default).
            .args(["--repl-ping-replica-period", "1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawning redis-server (is it installed and on PATH?): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("redis-server exited with {status}"));
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("no PONG within {NODE_START_TIMEOUT:?}"));
            }
            thread::sleep(super::POLL);
        }
    }

    /// SIGKILLs the process (by its pid) and reaps it. No-op if not running.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn peer(&self) -> Peer {
        Peer {
            port: self.port,
            log: self.log.clone(),
        }
    }
}

/// A running Redis Cluster on loopback. Dropping it kills every node by its
/// pid and removes its directory (after printing the logs' tails if the
/// test is panicking).
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// The masters' ports right after the start (for [`RedisCluster::url`]).
    start_masters: Vec<u16>,
    extra_args: Vec<String>,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create
    /// … --cluster-replicas N --cluster-yes` and returns once every node
    /// says `cluster_state:ok`, every node's `CLUSTER SLOTS` is the same map
    /// covering all 16384 slots with `opts.masters` masters of
    /// `opts.replicas_per_master` replicas each, and every replica says
    /// `master_link_status:up`.
    ///
    /// redis-cli decides which replica follows which master (all nodes are
    /// on 127.0.0.1, so it warns about anti-affinity and goes on): ask
    /// [`RedisCluster::replicas_of`].
    pub fn start(opts: ClusterOptions) -> RedisCluster {
        assert!(
            opts.masters >= 3,
            "ClusterOptions::masters is {}: redis-cli --cluster create needs at least 3",
            opts.masters
        );
        let mut cluster = RedisCluster {
            dir: fresh_temp_dir("cluster"),
            nodes: Vec::new(),
            start_masters: Vec::new(),
            extra_args: opts.extra_args.clone(),
        };
        for i in 0..opts.masters * (1 + opts.replicas_per_master) {
            let node = cluster.start_new_node(i);
            cluster.nodes.push(node);
        }
        cluster.create(opts.replicas_per_master);
        let expected = (opts.masters, opts.replicas_per_master);
        let map = cluster.wait_for("the new cluster to settle", SETTLE_TIMEOUT, |peers| {
            let map = settled(peers)?;
            let shape = masters_and_replicas(&map);
            let ok = shape.len() == expected.0 && shape.values().all(|r| r.len() == expected.1);
            if ok {
                Ok(map)
            } else {
                Err(format!(
                    "want {expected:?} (masters, replicas each), have {shape:?}"
                ))
            }
        });
        cluster.start_masters = masters_and_replicas(&map).into_keys().collect();
        cluster
    }

    /// A node on free ports in `node-<index>` under the cluster's dir,
    /// answering PING. Tries new ports when the chosen ones were taken.
    fn start_new_node(&self, index: usize) -> Node {
        let dir = self.dir.join(format!("node-{index}"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut node = Node {
            port: 0,
            bus_port: 0,
            log: dir.join("redis.log"),
            dir,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            node.port = free_port();
            node.bus_port = free_port();
            if node.bus_port == node.port {
                continue;
            }
            match node.spawn(&self.extra_args) {
                Ok(()) => return node,
                Err(e) => last = e,
            }
            if !read_log(&node.log).contains("Address already in use") {
                break;
            }
        }
        panic!(
            "could not start cluster node {index} (port {}, bus {}): {last}\n--- {} ---\n{}",
            node.port,
            node.bus_port,
            node.log.display(),
            tail(&read_log(&node.log))
        );
    }

    /// `redis-cli --cluster create`, with a deadline; panics with its output.
    fn create(&self, replicas: usize) {
        let log_path = self.dir.join("create.log");
        let log = open_log(&log_path);
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        let mut child = cmd
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning redis-cli (is it installed and on PATH?): {e}"));
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-cli --cluster create did not finish within {CREATE_TIMEOUT:?}\n\
                     --- redis-cli ---\n{}\n{}",
                    tail(&read_log(&log_path)),
                    log_tails(&self.peers())
                );
            }
            thread::sleep(CLUSTER_POLL);
        };
        assert!(
            status.success(),
            "redis-cli --cluster create exited with {status}\n--- redis-cli ---\n{}\n{}",
            tail(&read_log(&log_path)),
            log_tails(&self.peers())
        );
    }

    /// The nodes this harness runs now (not killed).
    fn peers(&self) -> Vec<Peer> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(Node::peer)
            .collect()
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// [`wait_for`] over the running nodes.
    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&[Peer]) -> Result<T, String>,
    ) -> T {
        wait_for(&self.peers(), what, timeout, f)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`: the masters at start.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .start_masters
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Every node's port, in start order (killed ones too).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The masters serving at least one slot now, sorted, once every
    /// running node agrees on the slot map.
    pub fn master_ports(&self) -> Vec<u16> {
        masters_and_replicas(&self.agreed_map())
            .into_keys()
            .collect()
    }

    /// The replicas of the master on `port` (sorted) in the agreed slot map.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        masters_and_replicas(&self.agreed_map())
            .remove(&port)
            .unwrap_or_else(|| panic!("127.0.0.1:{port} serves no slot"))
    }

    /// The slot map once every running node gives the same one.
    fn agreed_map(&self) -> SlotMap {
        self.wait_for(
            "the nodes to agree on the slot map",
            SETTLE_TIMEOUT,
            agreed_map,
        )
    }

    /// The key's hash slot: CRC16/XMODEM of the key (or of its hash tag, the
    /// part between the first `{` and the next `}`, when non-empty) mod
    /// 16384. Computed here, no server asked.
    pub fn slot_of(key: &str) -> u16 {
        let key = key.as_bytes();
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                let close = rest.iter().position(|&b| b == b'}')?;
                (close > 0).then(|| &rest[..close])
            })
            .unwrap_or(key);
        crc16_xmodem(hashed) % SLOTS
    }

    /// The port of the master serving `slot`, once every running node names
    /// the same one. Between a master's death and its failover that is still
    /// the dead master.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        self.wait_for(
            &format!("the nodes to agree on the owner of slot {slot}"),
            SETTLE_TIMEOUT,
            |peers| owner_in(&agreed_map(peers)?, slot),
        )
    }

    /// A hash tag (put it between `{}` in key names) whose slot the master
    /// on `port` serves now.
    pub fn hash_tag_served_by(&self, port: u16) -> String {
        self.hash_tags_served_by(port, 1).remove(0)
    }

    /// `n` hash tags of different slots, all served by the master on `port`.
    pub fn hash_tags_served_by(&self, port: u16, n: usize) -> Vec<String> {
        let map = self.agreed_map();
        let mut seen = std::collections::HashSet::new();
        let tags: Vec<String> = (0..100_000)
            .map(|i| format!("t{i}"))
            .filter(|tag| owner_in(&map, RedisCluster::slot_of(tag)) == Ok(port))
            .filter(|tag| seen.insert(RedisCluster::slot_of(tag)))
            .take(n)
            .collect();
        assert_eq!(
            tags.len(),
            n,
            "not {n} hash tags for 127.0.0.1:{port} in {map:?}"
        );
        tags
    }

    /// A plain connection to the node on `port` (5 s connect/read/write
    /// timeouts). It gets MOVED/ASK errors for keys it does not serve.
    pub fn node_conn(&self, port: u16) -> redis::Connection {
        try_conn(port, CONN_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "connecting to cluster node {port}: {e}\n{}",
                self.log_tail(port)
            )
        })
    }

    /// A `redis` crate cluster connection seeded with every running node (5 s
    /// connect and response timeouts). It follows MOVED and ASK itself.
    pub fn cluster_conn(&self) -> ClusterConnection {
        let nodes: Vec<String> = self
            .peers()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{}/", p.port))
            .collect();
        ClusterClient::builder(nodes)
            .connection_timeout(CONN_TIMEOUT)
            .response_timeout(CONN_TIMEOUT)
            .build()
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| {
                panic!(
                    "opening a cluster connection: {e}\n{}",
                    log_tails(&self.peers())
                )
            })
    }

    /// SIGKILLs the node on `port` (by pid). No-op if it is not running.
    pub fn kill_node(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// SIGKILLs the master serving `slot` and returns its port. Does not
    /// wait for anything else: see [`RedisCluster::wait_failover`].
    pub fn kill_master_of(&mut self, slot: u16) -> u16 {
        let port = self.owner_of_slot(slot);
        self.kill_node(port);
        port
    }

    /// Waits until a node other than `old_port` serves `slot` and the
    /// running nodes have settled (see [`RedisCluster::wait_settled`]);
    /// returns the new master's port.
    pub fn wait_failover(&self, slot: u16, old_port: u16, timeout: Duration) -> u16 {
        self.wait_for(
            &format!("a failover of slot {slot} away from 127.0.0.1:{old_port}"),
            timeout,
            |peers| {
                let owner = owner_in(&settled(peers)?, slot)?;
                if owner == old_port {
                    Err(format!("slot {slot} still served by {old_port}"))
                } else {
                    Ok(owner)
                }
            },
        )
    }

    /// Waits until the running nodes have settled: each says
    /// `cluster_state:ok`, all give the same `CLUSTER SLOTS` covering every
    /// slot, no killed node serves a slot, every running replica in it says
    /// `master_link_status:up`, and every running node is in it (or is a
    /// master without slots). E.g. after [`RedisCluster::restart_node`], for
    /// the node to be back as a replica.
    pub fn wait_settled(&self, timeout: Duration) {
        self.wait_for("the cluster to settle", timeout, settled);
    }

    /// Starts the killed node on `port` again, same ports and dir (its
    /// nodes.conf and AOF), and waits until it answers PING. A former master
    /// rejoins as a replica of the node that took its slots; wait for that
    /// with [`RedisCluster::wait_settled`]. Kills it first if it is running;
    /// retries while the port is briefly busy.
    pub fn restart_node(&mut self, port: u16) {
        let extra_args = self.extra_args.clone();
        let node = self.node_mut(port);
        node.kill();
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            let err = match node.spawn(&extra_args) {
                Ok(()) => return,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "could not restart cluster node {port}: {err}\n--- {} ---\n{}",
                    node.log.display(),
                    tail(&read_log(&node.log))
                );
            }
            thread::sleep(CLUSTER_POLL);
        }
    }

    /// The whole live resharding of one slot to the master on `to_port`:
    /// [`RedisCluster::begin_migrate_slot`], then [`Migration::finish`].
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        self.begin_migrate_slot(slot, to_port).finish();
    }

    /// The first half of a resharding: `CLUSTER SETSLOT slot IMPORTING` on
    /// the target, `MIGRATING` on the current owner. No key moves yet: move
    /// them with [`Migration::move_keys`]; meanwhile a client gets ASK for
    /// the moved ones. Panics if `to_port` already serves the slot.
    pub fn begin_migrate_slot(&self, slot: u16, to_port: u16) -> Migration {
        let source = self.owner_of_slot(slot);
        assert_ne!(
            source, to_port,
            "slot {slot} is already served by 127.0.0.1:{to_port}"
        );
        let peers = self.peers();
        let m = Migration {
            slot,
            source,
            target: to_port,
            source_id: self.node_id(source),
            target_id: self.node_id(to_port),
            peers,
        };
        m.setslot(to_port, "IMPORTING", &m.source_id);
        m.setslot(source, "MIGRATING", &m.target_id);
        m
    }

    /// `CLUSTER MYID` of the node on `port`.
    fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node_conn(port))
            .unwrap_or_else(|e| panic!("CLUSTER MYID on {port}: {e}"))
    }

    /// The process id of the node on `port`, while it runs (e.g. to SIGSTOP
    /// it for a stall).
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
            .child
            .as_ref()
            .map(Child::id)
    }

    /// The node's directory (nodes.conf, AOF, log).
    pub fn node_dir(&self, port: u16) -> &Path {
        &self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
            .dir
    }

    /// The last few KB of the node's log (all its starts), for panic
    /// messages.
    pub fn log_tail(&self, port: u16) -> String {
        match self.nodes.iter().find(|n| n.port == port) {
            Some(n) => format!(
                "--- cluster node :{port} log (tail) ---\n{}",
                tail(&read_log(&n.log))
            ),
            None => format!("<no cluster node on port {port}>"),
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if thread::panicking() {
            let all: Vec<Peer> = self.nodes.iter().map(Node::peer).collect();
            eprintln!(
                "--- redis-cli --cluster create ---\n{}\n{}\n--- end of cluster logs ---",
                tail(&read_log(&self.dir.join("create.log"))),
                log_tails(&all)
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A slot half moved from one master to another (see
/// [`RedisCluster::begin_migrate_slot`]). Dropping it without
/// [`Migration::finish`] leaves the slot half-migrated.
pub struct Migration {
    slot: u16,
    source: u16,
    target: u16,
    source_id: String,
    target_id: String,
    /// The nodes running when the migration began (asked by `finish`).
    peers: Vec<Peer>,
}

impl Migration {
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The port of the master the slot moves away from.
    pub fn source(&self) -> u16 {
        self.source
    }

    /// The port of the master the slot moves to.
    pub fn target(&self) -> u16 {
        self.target
    }

    /// Moves up to `n` of the slot's keys still on the source to the target
    /// (`CLUSTER GETKEYSINSLOT`, then `MIGRATE 127.0.0.1 port "" 0 5000 KEYS
    /// …`, by pages of 100); returns how many moved (0: none left).
    pub fn move_keys(&self, n: usize) -> usize {
        let mut conn = self.conn(self.source);
        let mut moved = 0;
        while moved < n {
            let page = (n - moved).min(MIGRATE_PAGE);
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(self.slot)
                .arg(page)
                .query(&mut conn)
                .unwrap_or_else(|e| self.fail(&format!("CLUSTER GETKEYSINSLOT: {e}")));
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(self.target)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS");
            for key in &keys {
                migrate.arg(key.as_slice());
            }
            let _: () = migrate
                .query(&mut conn)
                .unwrap_or_else(|e| self.fail(&format!("MIGRATE of {} keys: {e}", keys.len())));
            moved += keys.len();
        }
        moved
    }

    /// How many of the slot's keys are still on the source.
    pub fn keys_left(&self) -> usize {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(self.slot)
            .query(&mut self.conn(self.source))
            .unwrap_or_else(|e| self.fail(&format!("CLUSTER COUNTKEYSINSLOT: {e}")))
    }

    /// The second half: moves the keys still on the source (a source still
    /// holding keys refuses the next step), then `CLUSTER SETSLOT slot NODE
    /// target` on the target, the source, then the other masters; returns
    /// once the running nodes have settled with the target serving the slot.
    pub fn finish(self) {
        // Bounded: a source that keeps holding keys (something writing into
        // the slot on it) must not keep this loop going forever.
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while self.move_keys(MIGRATE_PAGE) > 0 {
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "keys still on the source after {SETTLE_TIMEOUT:?} of moving them"
                ));
            }
        }
        self.setslot(self.target, "NODE", &self.target_id);
        self.setslot(self.source, "NODE", &self.target_id);
        let map = wait_for(
            &self.peers,
            "the slot map after the migration",
            SETTLE_TIMEOUT,
            agreed_map,
        );
        for master in masters_and_replicas(&map).into_keys() {
            if master != self.source && master != self.target {
                self.setslot(master, "NODE", &self.target_id);
            }
        }
        let (slot, target) = (self.slot, self.target);
        wait_for(
            &self.peers,
            &format!("every node to name 127.0.0.1:{target} as the owner of slot {slot}"),
            SETTLE_TIMEOUT,
            |peers| {
                let owner = owner_in(&settled(peers)?, slot)?;
                if owner == target {
                    Ok(())
                } else {
                    Err(format!("slot {slot} served by {owner}"))
                }
            },
        );
    }

    /// `CLUSTER SETSLOT slot <state> <id>` on the node on `port`.
    fn setslot(&self, port: u16, state: &str, id: &str) {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(self.slot)
            .arg(state)
            .arg(id)
            .query(&mut self.conn(port))
            .unwrap_or_else(|e| {
                self.fail(&format!(
                    "CLUSTER SETSLOT {} {state} {id} on {port}: {e}",
                    self.slot
                ))
            });
    }

    /// A connection with a read timeout longer than MIGRATE's own 5 s.
    fn conn(&self, port: u16) -> redis::Connection {
        try_conn(port, Duration::from_secs(15))
            .unwrap_or_else(|e| self.fail(&format!("connecting to {port}: {e}")))
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "migrating slot {} from {} to {}: {what}\n{}",
            self.slot,
            self.source,
            self.target,
            log_tails(&self.peers)
        )
    }
}

/// Polls `f` over `peers` every [`CLUSTER_POLL`] until it returns `Ok`;
/// panics at the deadline with its last `Err` and the peers' log tails.
fn wait_for<T>(
    peers: &[Peer],
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&[Peer]) -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f(peers) {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => panic!(
                "timed out after {timeout:?} waiting for {what}; last seen: {why}\n{}",
                log_tails(peers)
            ),
            Err(_) => thread::sleep(CLUSTER_POLL),
        }
    }
}

fn log_tails(peers: &[Peer]) -> String {
    peers
        .iter()
        .map(|p| {
            format!(
                "--- cluster node :{} log (tail) ---\n{}",
                p.port,
                tail(&read_log(&p.log))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The slot map when every peer gives the same one, covering all slots.
fn agreed_map(peers: &[Peer]) -> Result<SlotMap, String> {
    let mut agreed: Option<(u16, SlotMap)> = None;
    for p in peers {
        let map = slot_map(p.port)?;
        match &agreed {
            None => agreed = Some((p.port, map)),
            Some((first, seen)) if *seen != map => {
                return Err(format!("{first} says {seen:?} but {} says {map:?}", p.port))
            }
            Some(_) => {}
        }
    }
    let (_, map) = agreed.ok_or("no cluster node is running")?;
    let mut next = 0u32;
    for r in &map {
        if u32::from(r.start) != next {
            return Err(format!("slot {next} is not served: {map:?}"));
        }
        next = u32::from(r.end) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(format!("slots {next}.. are not served: {map:?}"));
    }
    Ok(map)
}

/// The agreed map once the peers have settled (see
/// [`RedisCluster::wait_settled`]).
fn settled(peers: &[Peer]) -> Result<SlotMap, String> {
    for p in peers {
        let info: String = query(p.port, redis::cmd("CLUSTER").arg("INFO"))?;
        if !info.contains("cluster_state:ok") {
            return Err(format!("{} is not cluster_state:ok", p.port));
        }
    }
    let map = agreed_map(peers)?;
    let live: BTreeSet<u16> = peers.iter().map(|p| p.port).collect();
    let shape = masters_and_replicas(&map);
    if let Some(dead) = shape.keys().find(|m| !live.contains(m)) {
        return Err(format!("killed node {dead} still serves slots"));
    }
    let replicas: BTreeSet<u16> = shape.values().flatten().copied().collect();
    for &port in live.iter().filter(|p| replicas.contains(p)) {
        let info: String = query(port, redis::cmd("INFO").arg("replication"))?;
        if !info.contains("master_link_status:up") {
            return Err(format!("replica {port} is not master_link_status:up"));
        }
    }
    for &port in live
        .iter()
        .filter(|p| !shape.contains_key(p) && !replicas.contains(p))
    {
        let role: Vec<Value> = query(port, &redis::cmd("ROLE"))?;
        if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
            return Err(format!("{port} is not in the slot map yet: {map:?}"));
        }
    }
    Ok(map)
}

/// Each master in the map with its replicas.
fn masters_and_replicas(map: &SlotMap) -> BTreeMap<u16, Vec<u16>> {
    map.iter().map(|r| (r.master, r.replicas.clone())).collect()
}

fn owner_in(map: &SlotMap, slot: u16) -> Result<u16, String> {
    map.iter()
        .find(|r| r.start <= slot && slot <= r.end)
        .map(|r| r.master)
        .ok_or_else(|| format!("slot {slot} is not in {map:?}"))
}

/// The node's `CLUSTER SLOTS`, by ports, sorted.
fn slot_map(port: u16) -> Result<SlotMap, String> {
    let reply: Vec<Value> = query(port, redis::cmd("CLUSTER").arg("SLOTS"))?;
    let bad = |what: &str| format!("{port}: CLUSTER SLOTS: {what}");
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).map_err(|_| bad("slot or port out of range")),
        _ => Err(bad("a slot or port is not an integer")),
    };
    let mut map = Vec::with_capacity(reply.len());
    for entry in &reply {
        let Value::Array(fields) = entry else {
            return Err(bad("an entry is not an array"));
        };
        let [start, end, nodes @ ..] = fields.as_slice() else {
            return Err(bad("an entry is too short"));
        };
        let mut ports = Vec::with_capacity(nodes.len());
        for node in nodes {
            match node {
                Value::Array(n) if n.len() >= 2 => ports.push(int(&n[1])?),
                _ => return Err(bad("a node is not [host, port, …]")),
            }
        }
        let Some((&master, replicas)) = ports.split_first() else {
            return Err(bad("a range has no master"));
        };
        let mut replicas = replicas.to_vec();
        replicas.sort_unstable();
        map.push(SlotRange {
            start: int(start)?,
            end: int(end)?,
            master,
            replicas,
        });
    }
    map.sort();
    Ok(map)
}

/// One command on a short-lived connection to the node on `port`.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = try_conn(port, CONN_TIMEOUT)?;
    cmd.query(&mut conn).map_err(|e| format!("{port}: {e}"))
}

/// A connection to the node on `port` with `timeout` for reads and writes
/// (connecting waits at most 5 s).
fn try_conn(port: u16, timeout: Duration) -> Result<redis::Connection, String> {
    let conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection_with_timeout(CONN_TIMEOUT))
        .map_err(|e| format!("connecting to {port}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{port}: setting timeouts: {e}"))?;
    Ok(conn)
}

/// Whether the node answers PING now (not while loading its AOF).
fn ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    matches!(
        redis::cmd("PING").query::<String>(&mut conn).as_deref(),
        Ok("PONG")
    )
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0, no reflection), the hash of
/// Redis Cluster's key slots.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
