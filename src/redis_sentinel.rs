//! Redis Sentinel: the `redis+sentinel://` / `rediss+sentinel://` URL form,
//! and finding the current master through the sentinels (`SENTINEL
//! get-master-addr-by-name`, then `ROLE` on the address named) within the
//! caller's timeouts. [`crate::redis_conn::connect`] calls it for every
//! connection, so a thread that lost its connection (or was told READONLY,
//! MASTERDOWN, UNBLOCKED) finds the new master when it reconnects. A change
//! of master is logged once per process, with the old and the new address.
//!
//! It does not talk to replicas, keep connections to the sentinels or
//! subscribe to their events: asking at each connect is enough, and bounded.
//! The redis crate's own `sentinel` module is not used: its sync client
//! opens connections without timeouts.

use crate::config::Secret;
use crate::sync::lock;
use redis::{Client, Connection, ErrorKind, RedisError, RedisResult, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// The port a sentinel listens on when the URL gives none.
pub const DEFAULT_PORT: u16 = 26379;

/// The URL form, for error messages.
pub const FORM: &str =
    "redis+sentinel://[USER:PASSWORD@]HOST[:PORT],HOST[:PORT],…/MASTER-NAME[/DB]";

/// A parsed `redis+sentinel://` URL. `userinfo` (as written, still
/// percent-encoded) and the query are for the data nodes (the master).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the master (and, unless `sentinel-tls`
    /// says otherwise, to the sentinels).
    pub tls: bool,
    userinfo: Option<String>,
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    db: Option<u32>,
    /// `?…` (with the `?`), or empty.
    query: String,
    /// `#…` (with the `#`, e.g. `#insecure`), or empty.
    fragment: String,
}

/// How this process talks to the sentinels themselves (settings
/// `sentinel-username`, `sentinel-password`, `sentinel-tls`); the URL's
/// credentials are the data nodes'.
#[derive(Debug, Clone, Default)]
pub struct SentinelAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `None`: like the data nodes (the URL's scheme).
    pub tls: Option<bool>,
}

static AUTH: RwLock<Option<SentinelAuth>> = RwLock::new(None);

/// Whether the first master found is logged at INFO (the long-running
/// commands) rather than DEBUG (`submit`, `dlq`, `status`: their stderr is
/// for the operator).
static ANNOUNCE: AtomicBool = AtomicBool::new(false);

/// Log the master found first at INFO from now on.
pub fn announce_master() {
    ANNOUNCE.store(true, Ordering::Relaxed);
}

/// Set how the sentinels are reached; `main` calls it once the settings are
/// read, before any connection.
pub fn configure(auth: SentinelAuth) {
    *AUTH.write().unwrap_or_else(|e| e.into_inner()) = Some(auth);
}

fn auth() -> SentinelAuth {
    AUTH.read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Whether `url` uses a Sentinel scheme.
pub fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        matches!(
            scheme.to_ascii_lowercase().as_str(),
            "redis+sentinel" | "rediss+sentinel"
        )
    })
}

impl SentinelUrl {
    /// Read a `redis+sentinel://` or `rediss+sentinel://` URL; the error says
    /// what is wrong in plain words (without the password).
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("it does not start with redis+sentinel://")?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "redis+sentinel" => false,
            "rediss+sentinel" => true,
            other => return Err(format!("{other}:// is not a Sentinel scheme")),
        };
        if url.contains(char::is_whitespace) {
            return Err("it contains white space".into());
        }
        let (rest, fragment) = match rest.find('#') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, String::new()),
        };
        if !matches!(fragment.as_str(), "" | "#insecure") {
            return Err(format!(
                "'{fragment}' is not a known option (only #insecure: TLS without checking the certificate)"
            ));
        }
        let (rest, query) = match rest.find('?') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, String::new()),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, authority),
        };
        let mut sentinels = Vec::new();
        for item in hosts.split(',') {
            sentinels.push(host_port(item)?);
        }
        let mut segments = path.split('/');
        let master = segments.next().unwrap_or_default();
        if master.is_empty() {
            return Err(
                "it names no master after the sentinels (…:26379/MASTER-NAME, the name in \
                 the sentinels' 'sentinel monitor' line)"
                    .into(),
            );
        }
        let db = match segments.next() {
            None | Some("") => None,
            Some(d) => Some(d.parse::<u32>().map_err(|_| {
                format!(
                    "the database after the master name must be a number (/0, /1, …), not '{d}'"
                )
            })?),
        };
        if let Some(extra) = segments.find(|s| !s.is_empty()) {
            return Err(format!(
                "'{extra}' after the database is not part of the form"
            ));
        }
        let parsed = SentinelUrl {
            tls,
            userinfo,
            sentinels,
            master: master.to_owned(),
            db,
            query,
            fragment,
        };
        // The client's own parser has the last word on the query, the
        // fragment and the credentials.
        if Client::open(parsed.master_url("127.0.0.1", 6379)).is_err() {
            return Err("the Redis client cannot read its credentials, query or fragment".into());
        }
        Ok(parsed)
    }

    /// The URL of the data node at `host:port`, with the URL's credentials,
    /// database, query and fragment.
    fn master_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self
            .userinfo
            .as_ref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let db = self.db.map(|d| d.to_string()).unwrap_or_default();
        format!(
            "{scheme}://{user}{}/{db}{}{}",
            bracket(host, port),
            self.query,
            self.fragment
        )
    }

    /// The URL of sentinel `i`, with the sentinels' own credentials.
    fn sentinel_url(&self, i: usize, auth: &SentinelAuth) -> String {
        let (host, port) = &self.sentinels[i];
        let scheme = if auth.tls.unwrap_or(self.tls) {
            "rediss"
        } else {
            "redis"
        };
        let user = match (&auth.username, &auth.password) {
            (None, None) => String::new(),
            (Some(u), None) => format!("{}@", crate::percent::encode(u)),
            (u, Some(p)) => format!(
                "{}:{}@",
                crate::percent::encode(u.as_deref().unwrap_or_default()),
                crate::percent::encode(&p.0)
            ),
        };
        let insecure = if self.fragment == "#insecure" {
            "#insecure"
        } else {
            ""
        };
        format!("{scheme}://{user}{}/{insecure}", bracket(host, *port))
    }

    /// Who is asked, for the process-wide record of the master.
    fn key(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|(h, p)| bracket(h, *p)).collect();
        format!("{}/{}", hosts.join(","), self.master)
    }
}

/// `host[:port]` or `[v6][:port]` of one sentinel.
fn host_port(item: &str) -> Result<(String, u16), String> {
    let (host, port) = match item.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return Err(format!("the IPv6 host in '{item}' is not closed with ]")),
        },
        None => match item.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (item, None),
        },
    };
    if host.is_empty() {
        return Err(if item.is_empty() {
            "it names no sentinel host (an empty entry in HOST:PORT,HOST:PORT)".into()
        } else {
            format!("'{item}' names no host")
        });
    }
    if host == "0.0.0.0" || host == "::" {
        return Err(format!(
            "{host} is an address to listen on, not one to connect to"
        ));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n @ 1..) => n,
            _ => {
                return Err(format!(
                    "the port of sentinel '{item}' must be a number from 1 to 65535, not '{p}'"
                ))
            }
        },
    };
    Ok((host.to_owned(), port))
}

fn bracket(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What this process last saw of each master: its address, and which
/// sentinel named it (asked first next time).
static MASTERS: Mutex<Option<HashMap<String, (String, usize)>>> = Mutex::new(None);

/// Open a connection to the current master: ask each sentinel in turn (the
/// one that answered last first) for the master's address, connect there and
/// check with `ROLE` that it is a master. Every step is bounded by
/// `timeout`; the read timeout of the connection is the caller's to set.
pub fn connect_master(url: &SentinelUrl, timeout: Duration) -> RedisResult<Connection> {
    let auth = auth();
    let key = url.key();
    let first = lock(&MASTERS)
        .as_ref()
        .and_then(|m| m.get(&key))
        .map_or(0, |(_, i)| *i);
    let n = url.sentinels.len();
    let mut why = Vec::new();
    // A master that failed is not tried again for the next sentinel that
    // names it (a blackholed one would cost a timeout each time).
    let mut failed: Vec<String> = Vec::new();
    for i in (0..n).map(|k| (first + k) % n) {
        let (sh, sp) = &url.sentinels[i];
        let (host, port) = match ask(url, i, &auth, timeout) {
            Ok(addr) => addr,
            Err(e) => {
                why.push(format!("sentinel {}: {e}", bracket(sh, *sp)));
                continue;
            }
        };
        let addr = bracket(&host, port);
        if failed.contains(&addr) {
            why.push(format!("sentinel {} names {addr} too", bracket(sh, *sp)));
            continue;
        }
        match open_master(&url.master_url(&host, port), timeout) {
            Ok(conn) => {
                note_master(&key, &url.master, &addr, i);
                return Ok(conn);
            }
            Err(e) => {
                why.push(format!(
                    "master {addr} (named by sentinel {}): {e}",
                    bracket(sh, *sp)
                ));
                failed.push(addr);
            }
        }
    }
    Err(RedisError::from((
        ErrorKind::Io,
        "no sentinel named a reachable master",
        format!("master '{}': {}", url.master, why.join("; ")),
    )))
}

/// A client error in words: a timeout says how long was waited (the OS's
/// own text is "Resource temporarily unavailable").
fn said(e: &RedisError, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("no answer within {timeout:?}")
    } else {
        e.to_string()
    }
}

/// A connection to `url` whose connect, reads and writes are each bounded
/// by `timeout`; the error in words.
fn open_bounded(url: &str, timeout: Duration) -> Result<Connection, String> {
    let client = Client::open(url).map_err(|e| e.to_string())?;
    let conn = client
        .get_connection_with_timeout(timeout)
        .map_err(|e| said(&e, timeout))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// `SENTINEL get-master-addr-by-name` at sentinel `i`.
fn ask(
    url: &SentinelUrl,
    i: usize,
    auth: &SentinelAuth,
    timeout: Duration,
) -> Result<(String, u16), String> {
    let mut conn = open_bounded(&url.sentinel_url(i, auth), timeout)?;
    let reply: Value = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&url.master)
        .query(&mut conn)
        .map_err(|e| {
            if e.to_string().to_ascii_lowercase().contains("unknown") {
                format!("is not a Redis Sentinel ({e})")
            } else {
                said(&e, timeout)
            }
        })?;
    let texts: Vec<String> = match reply {
        Value::Nil => {
            return Err(format!(
                "knows no master named '{}' (the name after the hosts in the URL must be one \
                 of its 'sentinel monitor' names)",
                url.master
            ))
        }
        other => redis::from_redis_value(other).map_err(|e| format!("odd answer: {e}"))?,
    };
    match texts.as_slice() {
        [host, port] => match port.parse::<u16>() {
            Ok(p) if !host.is_empty() => Ok((host.clone(), p)),
            _ => Err(format!("odd master address {host}:{port}")),
        },
        _ => Err(format!("odd answer {texts:?}")),
    }
}

/// Connect to the address a sentinel named and check it is a master.
fn open_master(url: &str, timeout: Duration) -> Result<Connection, String> {
    let mut conn = open_bounded(url, timeout)?;
    let role: Value = redis::cmd("ROLE")
        .query(&mut conn)
        .map_err(|e| said(&e, timeout))?;
    match role_name(&role).as_deref() {
        Some("master") => Ok(conn),
        Some(other) => Err(format!(
            "is a {other}, not the master (a failover under way?)"
        )),
        None => Err(format!("odd ROLE answer {role:?}")),
    }
}

fn role_name(role: &Value) -> Option<String> {
    match role {
        Value::Array(items) => match items.first()? {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Record the master's address; a change is logged here, once per process.
fn note_master(key: &str, name: &str, addr: &str, sentinel: usize) {
    let mut masters = lock(&MASTERS);
    let masters = masters.get_or_insert_with(HashMap::new);
    let old = masters.insert(key.to_owned(), (addr.to_owned(), sentinel));
    match old {
        None if ANNOUNCE.load(Ordering::Relaxed) => {
            log::info!("Redis Sentinel: master '{name}' is at {addr}")
        }
        None => log::debug!("Redis Sentinel: master '{name}' is at {addr}"),
        Some((old, _)) if old != addr => {
            log::warn!("Redis Sentinel: master '{name}' failed over from {old} to {addr}")
        }
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_sentinels_master_db_and_data_credentials() {
        let u = SentinelUrl::parse(
            "rediss+sentinel://app:p%40ss@s1:26380,[::1],s3/jobs-main/2?protocol=resp3#insecure",
        )
        .unwrap();
        assert!(u.tls);
        assert_eq!(
            u.sentinels,
            vec![
                ("s1".into(), 26380),
                ("::1".into(), DEFAULT_PORT),
                ("s3".into(), DEFAULT_PORT)
            ]
        );
        assert_eq!(u.master, "jobs-main");
        assert_eq!(
            u.master_url("10.0.0.5", 6380),
            "rediss://app:p%40ss@10.0.0.5:6380/2?protocol=resp3#insecure"
        );
        assert_eq!(
            u.master_url("fe80::1", 6379),
            "rediss://app:p%40ss@[fe80::1]:6379/2?protocol=resp3#insecure"
        );
        // The data nodes' password never goes to the sentinels.
        let plain = SentinelAuth::default();
        assert_eq!(u.sentinel_url(0, &plain), "rediss://s1:26380/#insecure");
        assert_eq!(u.sentinel_url(1, &plain), "rediss://[::1]:26379/#insecure");
        let own = SentinelAuth {
            username: None,
            password: Some(Secret("s:e/c@r%t".into())),
            tls: Some(false),
        };
        assert_eq!(
            u.sentinel_url(0, &own),
            "redis://:s%3Ae%2Fc%40r%25t@s1:26380/#insecure"
        );
        let user_only = SentinelAuth {
            username: Some("watcher".into()),
            ..SentinelAuth::default()
        };
        assert_eq!(
            u.sentinel_url(0, &user_only),
            "rediss://watcher@s1:26380/#insecure"
        );
        let both = SentinelAuth {
            username: Some("watcher".into()),
            password: Some(Secret("pw".into())),
            tls: None,
        };
        assert_eq!(
            u.sentinel_url(2, &both),
            "rediss://watcher:pw@s3:26379/#insecure"
        );
        let u = SentinelUrl::parse("redis+sentinel://h/m").unwrap();
        assert!(!u.tls);
        assert_eq!(u.master_url("h2", 7000), "redis://h2:7000/");
        assert_eq!(u.key(), "h:26379/m");
    }

    #[test]
    fn a_bad_sentinel_url_says_what_is_wrong() {
        let cases = [
            ("redis+sentinel://", "names no sentinel host"),
            ("redis+sentinel://h1,,h2/m", "an empty entry"),
            ("redis+sentinel://h1:26379", "names no master"),
            ("redis+sentinel://h1:26379/", "names no master"),
            ("redis+sentinel://h1:0/m", "from 1 to 65535, not '0'"),
            ("redis+sentinel://h1:x/m", "not 'x'"),
            ("redis+sentinel://:26379/m", "names no host"),
            ("redis+sentinel://0.0.0.0/m", "an address to listen on"),
            ("redis+sentinel://[::1/m", "not closed with ]"),
            ("redis+sentinel://h/m/x", "must be a number"),
            ("redis+sentinel://h/m/1/z", "not part of the form"),
            ("redis+sentinel://h /m", "white space"),
            (
                "rediss+sentinel://h/m#verify",
                "'#verify' is not a known option",
            ),
            ("redis+sentinel://h/m?protocol=resp9", "cannot read"),
        ];
        for (url, want) in cases {
            let err = SentinelUrl::parse(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
        assert!(is_sentinel_url("REDIS+SENTINEL://h/m"));
        assert!(is_sentinel_url("rediss+sentinel://h/m"));
        assert!(!is_sentinel_url("redis://h"));
    }

    #[test]
    fn unreachable_sentinels_are_one_error_naming_each() {
        // Port 1 on loopback: nothing listens there.
        let u = SentinelUrl::parse("redis+sentinel://:secret@127.0.0.1:1,127.0.0.1:1/m").unwrap();
        let err = connect_master(&u, Duration::from_millis(500))
            .err()
            .expect("nothing listens on port 1");
        assert!(err.is_io_error(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("no sentinel named a reachable master"),
            "{text}"
        );
        assert_eq!(text.matches("sentinel 127.0.0.1:1:").count(), 2, "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
