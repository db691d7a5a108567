//! The Redis Cluster test harness itself (tests/support/cluster.rs), checked
//! with the plain `redis` crate against real clusters on loopback: keys land
//! on the master `slot_of` names, a killed master's replica takes over with
//! the acknowledged writes, a resharded slot keeps a stream's pending entry,
//! and a half-migrated slot serves moved and unmoved keys (ASK). No citadel
//! code runs here.

mod support;

use std::path::Path;
use std::time::Duration;

use redis::cluster::ClusterConnection;
use redis::{RedisError, Value};
use support::cluster::{ClusterOptions, RedisCluster, SLOTS};

/// `GET key` through any connection.
fn get(conn: &mut impl redis::ConnectionLike, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(conn)
}

fn set(conn: &mut impl redis::ConnectionLike, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(conn)
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
}

/// The redirect a plain node connection got for `key`: ("MOVED" or "ASK",
/// port). Asserts that it names the key's slot and a loopback address.
fn redirect(key: &str, result: redis::RedisResult<Option<String>>) -> (String, u16) {
    let err: RedisError = match result {
        Ok(v) => panic!("expected a redirect for {key}, got {v:?}"),
        Err(e) => e,
    };
    let code = err.code().unwrap_or_default().to_string();
    let (addr, slot) = err
        .redirect_node()
        .unwrap_or_else(|| panic!("expected MOVED or ASK for {key}, got {err}"));
    assert_eq!(slot, RedisCluster::slot_of(key), "{err}");
    let port = addr
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("redirect to {addr}, not 127.0.0.1:PORT"));
    (code, port)
}

#[test]
fn slot_of_follows_crc16_and_hash_tag_rules() {
    // The CRC16/XMODEM check value, and examples from the cluster spec.
    assert_eq!(RedisCluster::slot_of("123456789"), 0x31C3);
    assert_eq!(RedisCluster::slot_of("foo"), 12182);
    assert_eq!(
        RedisCluster::slot_of("{user1000}.followers"),
        RedisCluster::slot_of("user1000")
    );
    assert_eq!(
        RedisCluster::slot_of("x{y}z{w}"),
        RedisCluster::slot_of("y")
    );
    assert_eq!(RedisCluster::slot_of("{a}b"), RedisCluster::slot_of("a"));
    // An empty tag hashes the whole key.
    assert_ne!(RedisCluster::slot_of("a{}b"), RedisCluster::slot_of(""));
    assert_ne!(RedisCluster::slot_of("{}{x}"), RedisCluster::slot_of("x"));
    assert!(RedisCluster::slot_of("\u{1F600}{") < SLOTS);
}

#[test]
#[should_panic(expected = "redis-cli --cluster create needs at least 3")]
fn fewer_than_three_masters_is_refused_before_anything_starts() {
    RedisCluster::start(ClusterOptions {
        masters: 2,
        ..ClusterOptions::default()
    });
}

#[test]
fn three_masters_serve_keys_where_slot_of_says() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3, "masters {masters:?}");
    assert_eq!(cluster.ports().len(), 3);
    let url = cluster.url();
    let hosts: Vec<String> = masters.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(url, format!("redis+cluster://{}", hosts.join(",")));

    // slot_of agrees with the server's CLUSTER KEYSLOT.
    let mut node = cluster.node_conn(masters[0]);
    let keys = [
        "",
        "foo",
        "123456789",
        "{a}b",
        "a{}b",
        "{}{x}",
        "x{y}z{w}",
        "a{b",
        "}{",
        "{{a}}",
        "{a}}",
        "{user1000}.following",
        "jobs:v1:gpu-general",
        "{jobs:v1}:dlq",
        "ключ{значение}",
    ];
    for key in keys {
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut node)
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key:?}: {e}"));
        assert_eq!(RedisCluster::slot_of(key), server, "slot of {key:?}");
    }

    // A key in a slot of each master is written through the cluster
    // connection, lands on that master, and other masters redirect to it.
    let mut cc: ClusterConnection = cluster.cluster_conn();
    for &master in &masters {
        let key = format!("{{{}}}:k", cluster.hash_tag_served_by(master));
        let slot = RedisCluster::slot_of(&key);
        assert_eq!(cluster.owner_of_slot(slot), master);
        let value = format!("on-{master}");
        set(&mut cc, &key, &value);
        assert_eq!(get(&mut cc, &key).unwrap().as_deref(), Some(&*value));
        let mut own = cluster.node_conn(master);
        assert_eq!(get(&mut own, &key).unwrap().as_deref(), Some(&*value));
        for &other in masters.iter().filter(|&&p| p != master) {
            let mut conn = cluster.node_conn(other);
            assert_eq!(
                redirect(&key, get(&mut conn, &key)),
                ("MOVED".to_string(), master),
                "GET {key} on {other}"
            );
        }
    }

    // Dropping it kills every node (reaped: no /proc entry) and removes
    // its files.
    let pids: Vec<u32> = cluster
        .ports()
        .iter()
        .map(|&p| cluster.pid(p).expect("a running node"))
        .collect();
    let dir = cluster.node_dir(masters[0]).to_path_buf();
    assert!(dir.join("nodes.conf").is_file(), "{}", dir.display());
    drop(cc);
    drop(cluster);
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn killed_master_fails_over_to_its_replica_with_acknowledged_writes() {
    let mut cluster = RedisCluster::start(ClusterOptions {
        replicas_per_master: 1,
        ..ClusterOptions::default()
    });
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3, "masters {masters:?}");
    assert_eq!(cluster.ports().len(), 6);
    let mut all: Vec<u16> = masters.clone();
    for &m in &masters {
        let replicas = cluster.replicas_of(m);
        assert_eq!(replicas.len(), 1, "replicas of {m}: {replicas:?}");
        all.extend(replicas);
    }
    all.sort_unstable();
    let mut ports = cluster.ports();
    ports.sort_unstable();
    assert_eq!(all, ports, "every node is a master or one master's replica");

    let master = masters[1];
    let replica = cluster.replicas_of(master)[0];
    let key = format!("{{{}}}:kept", cluster.hash_tag_served_by(master));
    let slot = RedisCluster::slot_of(&key);
    {
        let mut conn = cluster.node_conn(master);
        set(&mut conn, &key, "before the kill");
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(15_000)
            .query(&mut conn)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica acknowledged the write");
    }

    let old = cluster.kill_master_of(slot);
    assert_eq!(old, master);
    assert_eq!(cluster.pid(old), None, "killed");
    let new = cluster.wait_failover(slot, old, Duration::from_secs(60));
    assert_eq!(new, replica, "the only replica of {old} took over");
    assert_eq!(cluster.owner_of_slot(slot), new);
    assert!(!cluster.master_ports().contains(&old));

    let mut cc = cluster.cluster_conn();
    assert_eq!(
        get(&mut cc, &key).unwrap().as_deref(),
        Some("before the kill")
    );
    set(&mut cc, &key, "after the failover");
    let mut conn = cluster.node_conn(new);
    assert_eq!(
        get(&mut conn, &key).unwrap().as_deref(),
        Some("after the failover")
    );

    // The old master comes back as the new master's replica.
    cluster.restart_node(old);
    cluster.wait_settled(Duration::from_secs(60));
    assert_eq!(cluster.replicas_of(new), vec![old]);
    assert_eq!(cluster.owner_of_slot(slot), new);
}

/// `XPENDING key group - + 10` as (id, consumer, deliveries).
fn pending(conn: &mut impl redis::ConnectionLike, key: &str) -> Vec<(String, String, u64)> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(key)
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .query(conn)
        .unwrap_or_else(|e| panic!("XPENDING {key}: {e}"));
    rows.into_iter().map(|(id, c, _, n)| (id, c, n)).collect()
}

/// `XREADGROUP GROUP g <consumer> COUNT 1 STREAMS key >`: the ids read.
fn read_new(conn: &mut impl redis::ConnectionLike, key: &str, consumer: &str) -> Vec<String> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg(consumer)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query(conn)
        .unwrap_or_else(|e| panic!("XREADGROUP {key}: {e}"));
    let reply: redis::streams::StreamReadReply =
        redis::from_redis_value(reply).expect("an XREADGROUP reply");
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|e| e.id)
        .collect()
}

#[test]
fn migrated_slot_keeps_a_streams_pending_entry() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let masters = cluster.master_ports();
    let (source, target) = (masters[0], masters[2]);
    let tag = cluster.hash_tag_served_by(source);
    let stream = format!("{{{tag}}}:jobs");
    let other = format!("{{{tag}}}:status");
    let slot = RedisCluster::slot_of(&stream);

    let mut cc = cluster.cluster_conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut cc)
        .expect("XGROUP CREATE");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("n")
                .arg(i)
                .query(&mut cc)
                .expect("XADD")
        })
        .collect();
    assert_eq!(read_new(&mut cc, &stream, "c1"), vec![ids[0].clone()]);
    set(&mut cc, &other, "kept");
    assert_eq!(
        pending(&mut cc, &stream),
        vec![(ids[0].clone(), "c1".to_string(), 1)]
    );

    cluster.migrate_slot(slot, target);
    assert_eq!(cluster.owner_of_slot(slot), target);

    // On the new owner itself: the entry is still pending for c1.
    let mut on_target = cluster.node_conn(target);
    assert_eq!(
        pending(&mut on_target, &stream),
        vec![(ids[0].clone(), "c1".to_string(), 1)]
    );
    let count: u64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query(&mut on_target)
        .unwrap();
    assert_eq!(count, 2, "both keys of the slot moved");
    let mut on_source = cluster.node_conn(source);
    assert_eq!(
        redirect(&other, get(&mut on_source, &other)),
        ("MOVED".to_string(), target)
    );

    // The cluster connection opened before the move follows the MOVED; the
    // group's last-delivered id came along (the next read is entry 2).
    assert_eq!(
        pending(&mut cc, &stream),
        vec![(ids[0].clone(), "c1".to_string(), 1)]
    );
    assert_eq!(read_new(&mut cc, &stream, "c2"), vec![ids[1].clone()]);
    assert_eq!(get(&mut cc, &other).unwrap().as_deref(), Some("kept"));
}

#[test]
fn half_migrated_slot_serves_moved_and_unmoved_keys() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let masters = cluster.master_ports();
    let (source, target) = (masters[1], masters[0]);
    let tag = cluster.hash_tag_served_by(source);
    let keys: Vec<String> = (0..10).map(|i| format!("{{{tag}}}:k{i}")).collect();
    let slot = RedisCluster::slot_of(&keys[0]);
    let mut on_source = cluster.node_conn(source);
    for (i, key) in keys.iter().enumerate() {
        set(&mut on_source, key, &format!("v{i}"));
    }
    let mut cc = cluster.cluster_conn();

    let migration = cluster.begin_migrate_slot(slot, target);
    assert_eq!((migration.source(), migration.target()), (source, target));
    assert_eq!(migration.keys_left(), 10);
    assert_eq!(migration.move_keys(5), 5);
    assert_eq!(migration.keys_left(), 5);

    // The source answers the moved keys with ASK, the others itself; the
    // target (only importing) answers MOVED without ASKING.
    let mut on_target = cluster.node_conn(target);
    let mut asked = 0;
    for (i, key) in keys.iter().enumerate() {
        match get(&mut on_source, key) {
            Ok(v) => assert_eq!(v, Some(format!("v{i}"))),
            Err(e) => {
                assert_eq!(redirect(key, Err(e)), ("ASK".to_string(), target));
                asked += 1;
            }
        }
        assert_eq!(
            redirect(key, get(&mut on_target, key)),
            ("MOVED".to_string(), source)
        );
    }
    assert_eq!(asked, 5, "half the keys moved");
    assert_eq!(cluster.owner_of_slot(slot), source);

    // The cluster connection reads all, and writes a new key (ASK to the
    // target, the source not having it).
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(get(&mut cc, key).unwrap(), Some(format!("v{i}")), "{key}");
    }
    let new_key = format!("{{{tag}}}:new");
    set(&mut cc, &new_key, "written half-way");
    assert_eq!(
        get(&mut cc, &new_key).unwrap().as_deref(),
        Some("written half-way")
    );

    migration.finish();
    assert_eq!(cluster.owner_of_slot(slot), target);
    assert_eq!(
        redirect(&keys[0], get(&mut on_source, &keys[0])),
        ("MOVED".to_string(), target)
    );
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(get(&mut cc, key).unwrap(), Some(format!("v{i}")), "{key}");
    }
    assert_eq!(
        get(&mut on_target, &new_key).unwrap().as_deref(),
        Some("written half-way")
    );
}
