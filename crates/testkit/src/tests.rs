//! The kit's own tests: servers start, stop, restart, stay isolated, and clean up.

use super::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

fn nats_info_of(url: &str) -> String {
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    nats_info(port).expect("NATS answers with INFO")
}

fn mongo_port_of(uri: &str) -> u16 {
    let rest = uri
        .strip_prefix("mongodb://127.0.0.1:")
        .expect("loopback mongo uri");
    rest.split('/').next().unwrap().parse().unwrap()
}

/// A tiny NATS client on the raw protocol: sends `PUB subject reply payload` and returns
/// the reply's payload.
fn nats_request(port: u16, subject: &str, payload: &str) -> String {
    let mut s = connect(port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let inbox = format!("_INBOX.{}", random_hex());
    write!(
        s,
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n{payload}\r\n",
        payload.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(at) = text.find(&format!("MSG {inbox} 1 ")) {
            let header_end = at + text[at..].find("\r\n").unwrap() + 2;
            let len: usize = text[at..header_end]
                .trim()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            if text.len() >= header_end + len {
                return text[header_end..header_end + len].to_owned();
            }
        }
    }
}

#[test]
fn bson_ok_parses_replies() {
    // {ok: 1.0}
    let mut d = vec![0, 0, 0, 0, 0x01];
    d.extend_from_slice(b"ok\0");
    d.extend_from_slice(&1.0f64.to_le_bytes());
    d.push(0);
    let l = d.len() as i32;
    d[..4].copy_from_slice(&l.to_le_bytes());
    assert!(bson_ok(&d));
    // {errmsg: "x", ok: 0.0}
    let mut d = vec![0, 0, 0, 0, 0x02];
    d.extend_from_slice(b"errmsg\0");
    d.extend_from_slice(&2i32.to_le_bytes());
    d.extend_from_slice(b"x\0");
    d.push(0x01);
    d.extend_from_slice(b"ok\0");
    d.extend_from_slice(&0.0f64.to_le_bytes());
    d.push(0);
    let l = d.len() as i32;
    d[..4].copy_from_slice(&l.to_le_bytes());
    assert!(!bson_ok(&d));
    assert!(!bson_ok(&[1, 2]));
}

#[tokio::test]
async fn start_gives_ready_servers() {
    let s = TestServers::start().await.expect("start");
    assert!(s.nats_url.starts_with("nats://"), "{}", s.nats_url);
    assert!(
        s.mongo_uri.contains("directConnection=true"),
        "{}",
        s.mongo_uri
    );
    assert!(nats_info_of(&s.nats_url).contains("\"jetstream\":true"));
    assert!(mongo_ping(mongo_port_of(&s.mongo_uri)).unwrap());
    assert!(
        s.namespace.starts_with('t') && s.namespace.len() == 13,
        "{}",
        s.namespace
    );
    assert!(s.namespace[1..].chars().all(|c| c.is_ascii_hexdigit()));
    assert!(s.mongo_db.starts_with("mz_test_"), "{}", s.mongo_db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kits_are_isolated() {
    let (a, b) = tokio::join!(TestServers::start(), TestServers::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    if env_nats_url().is_none() {
        assert_ne!(a.nats_url, b.nats_url);
        assert_ne!(a.nats_port(), b.nats_port());
    }
    if env_mongo_uri().is_none() {
        assert_ne!(a.mongo_uri, b.mongo_uri);
        assert_ne!(a.mongo_port(), b.mongo_port());
    }
    assert_ne!(a.namespace, b.namespace);
    assert_ne!(a.mongo_db, b.mongo_db);
    assert_ne!(a.data_dir(), b.data_dir());
}

#[tokio::test]
async fn start_nats_starts_only_nats() {
    let s = TestServers::start_nats().await.unwrap();
    assert!(s.mongo_uri.is_empty());
    assert_eq!(s.mongo_port(), None);
    assert!(nats_info_of(&s.nats_url).starts_with('{'));
}

#[test]
fn drop_stops_servers_and_removes_dir() {
    if env_nats_url().is_some() || env_mongo_uri().is_some() {
        return; // nothing of ours to stop
    }
    let s = TestServers::start_blocking().unwrap();
    let dir = s.data_dir().unwrap().to_owned();
    let (np, mp) = (s.nats_port().unwrap(), s.mongo_port().unwrap());
    assert!(dir.join("nats").is_dir() && dir.join("mongo").is_dir());
    drop(s);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(nats_info(np).is_err(), "nats still answers");
    assert!(mongo_ping(mp).is_err(), "mongo still answers");
}

#[tokio::test]
async fn restart_nats_keeps_port_and_jetstream_store() {
    if env_nats_url().is_some() {
        return;
    }
    let mut s = TestServers::start_nats().await.unwrap();
    let port = s.nats_port().unwrap();
    let stream = format!("{}_S", s.namespace);
    let config = format!(
        "{{\"name\":\"{stream}\",\"subjects\":[\"{}.>\"],\"storage\":\"file\"}}",
        s.namespace
    );
    let created = nats_request(port, &format!("$JS.API.STREAM.CREATE.{stream}"), &config);
    assert!(
        created.contains("stream_create_response") && !created.contains("\"error\""),
        "{created}"
    );
    let acked = nats_request(port, &format!("{}.a", s.namespace), "hello");
    assert!(acked.contains("\"seq\":1"), "{acked}");

    s.kill_nats().unwrap();
    assert!(nats_info(port).is_err(), "nats still answers after kill");
    s.restart_nats().await.unwrap();
    assert_eq!(s.nats_port(), Some(port));
    let info = nats_request(port, &format!("$JS.API.STREAM.INFO.{stream}"), "");
    assert!(info.contains("\"messages\":1"), "{info}");
}

#[tokio::test]
async fn restart_mongo_keeps_port() {
    if env_mongo_uri().is_some() {
        return;
    }
    let mut s = TestServers::start().await.unwrap();
    let port = s.mongo_port().unwrap();
    s.restart_mongo().await.unwrap();
    assert_eq!(s.mongo_port(), Some(port));
    assert!(mongo_ping(port).unwrap());
}

#[tokio::test]
async fn external_servers_cannot_be_restarted() {
    let mut s = TestServers::start_with(Some("nats://127.0.0.1:1".into()), None).unwrap();
    assert_eq!(s.nats_url, "nats://127.0.0.1:1");
    assert!(s.data_dir().is_none());
    assert!(matches!(s.restart_nats().await, Err(Error::NotManaged(_))));
    assert!(matches!(s.kill_mongo(), Err(Error::NotManaged(_))));
}

const WATCHDOG_FLAG: &str = "MZ_TESTKIT_WATCHDOG_CHILD";

/// A test process that dies by SIGKILL (no Drop) must not leak servers or data dirs.
#[test]
fn watchdog_cleans_up_after_sigkill() {
    use std::io::BufRead;
    if std::env::var_os(WATCHDOG_FLAG).is_some()
        || env_nats_url().is_some()
        || env_mongo_uri().is_some()
    {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::watchdog_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WATCHDOG_FLAG, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = loop {
        let line = lines
            .next()
            .expect("child printed no WATCHDOG_CHILD line")
            .unwrap();
        // libtest prints "test tests::watchdog_child ... " before it on the same line.
        if let Some(at) = line.find("WATCHDOG_CHILD ") {
            break line[at + "WATCHDOG_CHILD ".len()..].to_owned();
        }
    };
    let mut parts = line.split(' ');
    let (np, mp, dir): (u16, u16, PathBuf) = (
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().into(),
    );
    assert!(nats_info(np).is_ok() && mongo_ping(mp).unwrap());
    child.kill().unwrap(); // SIGKILL: the child's TestServers is never dropped
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (dir.exists() || nats_info(np).is_ok() || mongo_ping(mp).is_ok())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(nats_info(np).is_err(), "nats still answers");
    assert!(mongo_ping(mp).is_err(), "mongo still answers");
}

/// Only does something when run by `watchdog_cleans_up_after_sigkill`.
#[test]
fn watchdog_child() {
    if std::env::var_os(WATCHDOG_FLAG).is_none() {
        return;
    }
    let s = TestServers::start_blocking().unwrap();
    println!(
        "WATCHDOG_CHILD {} {} {}",
        s.nats_port().unwrap(),
        s.mongo_port().unwrap(),
        s.data_dir().unwrap().display()
    );
    std::thread::sleep(Duration::from_secs(60));
}

const CHILD_FLAG: &str = "MZ_TESTKIT_ENV_CHILD";

/// Runs `env_override_child` in a child process with NATS_URL/MONGO_URI pointing at this
/// kit's servers (env is process-global and `set_var` is unsafe, so no in-process setting).
#[tokio::test]
async fn env_override_is_honoured() {
    if std::env::var_os(CHILD_FLAG).is_some() {
        return;
    }
    let s = TestServers::start().await.unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "tests::env_override_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_FLAG, "1")
        .env("NATS_URL", &s.nats_url)
        .env("MONGO_URI", &s.mongo_uri)
        .env_remove("MONGODB_URI")
        .env("MZ_TESTKIT_EXPECT_NS_NOT", &s.namespace)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("ENV_OVERRIDE_CHILD_OK"),
        "child test did not run:\n{text}"
    );
}

/// Only does something when run by `env_override_is_honoured`.
#[tokio::test]
async fn env_override_child() {
    if std::env::var_os(CHILD_FLAG).is_none() {
        return;
    }
    let nats = std::env::var("NATS_URL").unwrap();
    let mongo = std::env::var("MONGO_URI").unwrap();
    let s = TestServers::start().await.unwrap();
    assert_eq!(s.nats_url, nats);
    assert_eq!(s.mongo_uri, mongo);
    assert_eq!(s.nats_port(), None);
    assert_eq!(s.mongo_port(), None);
    assert!(s.data_dir().is_none());
    assert_ne!(
        s.namespace,
        std::env::var("MZ_TESTKIT_EXPECT_NS_NOT").unwrap()
    );
    // The given servers are the parent's, and they answer.
    assert!(nats_info_of(&s.nats_url).contains("\"jetstream\":true"));
    assert!(mongo_ping(mongo_port_of(&s.mongo_uri)).unwrap());
    let n = TestServers::start_nats().await.unwrap();
    assert_eq!(n.nats_url, nats);
    assert!(n.mongo_uri.is_empty());
    println!("ENV_OVERRIDE_CHILD_OK");
}

#[test]
fn a_free_port_is_below_the_ephemeral_range_and_bindable() {
    let (low, _) = setup::ephemeral_range();
    let ports: Vec<u16> = (0..20).map(|_| free_port().expect("a port")).collect();
    for port in &ports {
        if low > 11_000 {
            assert!(
                (10_000..low).contains(port),
                "{port} is not below the ephemeral range starting at {low}"
            );
        }
        std::net::TcpListener::bind(("127.0.0.1", *port)).expect("the port is free");
    }
    let distinct: std::collections::HashSet<_> = ports.iter().collect();
    assert!(distinct.len() > 1, "twenty picks gave one port: {ports:?}");
}
