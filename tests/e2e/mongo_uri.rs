//! `MONGO_URI` naming a database (`mongodb://mongo:27017/MozaiksAI`, as the seeds' deployment
//! guides set it) puts the read models there unless `MOZAIKS_MONGO_DB` is set (issue 9, defect 7).

use std::process::Child;

use mongodb::bson::{Document, doc};
use serde_json::json;

use crate::fleet::*;

/// `uri` with its database (the path) set to `db`, options kept.
fn with_database(uri: &str, db: &str) -> String {
    let (scheme, rest) = uri.split_once("://").expect("a mongodb URI");
    let (rest, options) = match rest.split_once('?') {
        Some((r, o)) => (r, format!("?{o}")),
        None => (rest, String::new()),
    };
    let hosts = rest.split('/').next().unwrap();
    format!("{scheme}://{hosts}/{db}{options}")
}

/// Kills the process when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_in_mongo_uri_holds_the_read_models_without_mozaiks_mongo_db() {
    let servers = mozaiks_testkit::TestServers::start()
        .await
        .expect("test servers");
    // The test's own fresh database, named only in the URI.
    let uri = with_database(&servers.mongo_uri, &servers.mongo_db);
    let dir =
        std::env::temp_dir().join(format!("mozaiks-e2e-uri-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("all.log");
    let port = free_port();
    let mut cmd = command(&servers, "all", &log);
    cmd.env_remove("MOZAIKS_MONGO_DB")
        .env("MONGO_URI", &uri)
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .env("MOZAIKS_ARCHIVE_DIR", dir.join("archive"));
    let _all = Killed(cmd.spawn().expect("spawn mozaiks all"));
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            if let Ok(r) = http.get(format!("{base}/health/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "not ready; log:\n{}", logs());

    let alice = Fleet::token("alice", "default", &["user"]);
    let r = http
        .post(format!("{base}/api/sessions"))
        .bearer_auth(&alice)
        .json(&json!({"app_id": "default", "workflow_name": "hello", "message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ticket: serde_json::Value = r.json().await.unwrap();
    let chat = ticket["chat_id"].as_str().unwrap().to_string();

    let mongo = mongodb::Client::with_uri_str(&servers.mongo_uri)
        .await
        .unwrap();
    let sessions = mongo
        .database(&servers.mongo_db)
        .collection::<Document>("chat_sessions");
    let messages = mongo
        .database(&servers.mongo_db)
        .collection::<Document>("chat_messages");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let session = sessions.find_one(doc! {"chat_id": &chat}).await.unwrap();
        let n = messages
            .count_documents(doc! {"chat_id": &chat})
            .await
            .unwrap();
        if session.is_some() && n > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no read model of {chat} in {}; log:\n{}",
            servers.mongo_db,
            logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Not in the old default database.
    let stray = mongo
        .database("mozaiks")
        .collection::<Document>("chat_sessions")
        .find_one(doc! {"chat_id": &chat})
        .await
        .unwrap();
    assert!(stray.is_none(), "the session went to `mozaiks`");
    let _ = std::fs::remove_dir_all(&dir);
}
