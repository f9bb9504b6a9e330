//! Projection writes against a real Mongo-wire server: idempotent, forward-only, app-scoped.

use chrono::{Duration, Utc};
use mozaiks_events::{
    AgentMessage, ENVELOPE_VERSION, Envelope, Event, MessageUser, RunCompleted, RunStarted,
    SessionStarted,
};
use mozaiks_store::Store;
use mozaiks_testkit::TestServers;
use uuid::Uuid;

fn env(app: &str, chat: &str, seq: u64, event: Event) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: app.into(),
        chat_id: chat.into(),
        user_id: "u1".into(),
        workflow: "hello".into(),
        seq,
        ts: Utc::now() + Duration::milliseconds(seq as i64),
        parent_chat_id: None,
        causation_id: None,
        event,
    }
}

fn chat_events(app: &str, chat: &str) -> Vec<Envelope> {
    let run_id = Uuid::now_v7();
    vec![
        env(
            app,
            chat,
            1,
            Event::SessionStarted(SessionStarted::default()),
        ),
        env(
            app,
            chat,
            2,
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
        ),
        env(
            app,
            chat,
            3,
            Event::RunStarted(RunStarted {
                run_id,
                trigger_seq: 2,
            }),
        ),
        env(
            app,
            chat,
            4,
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "a".into(),
                text: "hello".into(),
                structured: None,
            }),
        ),
        env(
            app,
            chat,
            5,
            Event::RunCompleted(RunCompleted {
                run_id,
                steps: 1,
                output: "hello".into(),
            }),
        ),
    ]
}

async fn store(servers: &TestServers) -> Store {
    let s = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    s.ensure_indexes(s.shared()).await.unwrap();
    s
}

#[tokio::test]
async fn projecting_twice_changes_nothing() {
    let servers = TestServers::start().await.unwrap();
    let s = store(&servers).await;
    let events = chat_events("app1", "c1");
    s.project(&events).await.unwrap();
    let first = s.session("app1", "c1").await.unwrap().unwrap();
    s.project(&events).await.unwrap();
    let again = s.session("app1", "c1").await.unwrap().unwrap();
    assert_eq!(first, again);
    assert_eq!(again.status, "completed");
    assert_eq!(again.last_seq, 5);
    let msgs = s.messages("app1", "c1", 0, 100).await.unwrap();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 4]);
}

#[tokio::test]
async fn an_older_batch_never_moves_a_session_back() {
    let servers = TestServers::start().await.unwrap();
    let s = store(&servers).await;
    let events = chat_events("app1", "c1");
    s.project(&events).await.unwrap();
    // A redelivered older batch (e.g. after a projector crash) arrives later.
    s.project(&events[..3]).await.unwrap();
    let session = s.session("app1", "c1").await.unwrap().unwrap();
    assert_eq!(session.last_seq, 5);
    assert_eq!(session.status, "completed");
}

#[tokio::test]
async fn batches_split_anywhere_give_the_same_documents() {
    let servers = TestServers::start().await.unwrap();
    let s = store(&servers).await;
    let events = chat_events("app1", "c2");
    for e in &events {
        s.project(std::slice::from_ref(e)).await.unwrap();
    }
    let one_by_one = s.session("app1", "c2").await.unwrap().unwrap();
    assert_eq!(one_by_one.last_seq, 5);
    assert_eq!(one_by_one.status, "completed");
    assert_eq!(one_by_one.created_at, events[0].ts.with_nanosecond_millis());
}

#[tokio::test]
async fn reads_never_cross_apps() {
    let servers = TestServers::start().await.unwrap();
    let s = store(&servers).await;
    let mut both = chat_events("app1", "same-chat");
    both.extend(chat_events("app2", "same-chat"));
    s.project(&both).await.unwrap();
    assert!(s.session("app1", "same-chat").await.unwrap().is_some());
    assert!(s.session("app3", "same-chat").await.unwrap().is_none());
    assert_eq!(
        s.messages("app1", "same-chat", 0, 100).await.unwrap().len(),
        2
    );
    assert!(
        s.messages("app1", "same-chat", 0, 100)
            .await
            .unwrap()
            .iter()
            .all(|m| m.app_id == "app1")
    );
    assert_eq!(s.sessions_of_user("app2", "u1", 10).await.unwrap().len(), 1);
    assert_eq!(s.usage("app9").await.unwrap().total_tokens, 0);
}

/// BSON dates keep milliseconds.
trait Millis {
    fn with_nanosecond_millis(&self) -> Self;
}

impl Millis for chrono::DateTime<Utc> {
    fn with_nanosecond_millis(&self) -> Self {
        chrono::DateTime::from_timestamp_millis(self.timestamp_millis()).unwrap()
    }
}
