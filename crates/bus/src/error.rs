//! The bus's errors, with a kind that says what went wrong and whether a retry makes sense.
//!
//! As in async-nats (`Error<Kind>`), every failure of NATS itself keeps its source error and
//! carries an [`ErrorKind`] decided once, when the error is made, from the async-nats error kinds
//! and the JetStream API error codes in its source chain, never from its text. Callers decide on
//! the kind: the gateway answers 503 or 500 and picks a WebSocket close code from it, the roles
//! ask the keeper to re-apply the definitions when something is [missing](Error::is_missing).

use std::error::Error as StdError;

use async_nats::jetstream;

/// What a failure of the bus means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection to NATS is down or broke during the request (I/O, broken pipe, flush).
    Disconnected,
    /// NATS or JetStream did not answer in time.
    TimedOut,
    /// Nobody answered the request: JetStream is not running (yet) for the account.
    NoResponders,
    /// JetStream answered that it cannot serve the request now (no leader, no quorum, a 5xx API
    /// error), or the failure is of no more precise kind.
    Unavailable,
    /// A stream, consumer, bucket or message the request names does not exist on the server
    /// (a lost stream is re-created by the keeper from `streams/`).
    NotFound,
    /// Another writer came first (wrong last sequence or revision): read again, then retry.
    Conflict,
    /// The server refused the request as such (invalid name or configuration, a limit, a payload
    /// too big, denied): the same request fails again.
    Rejected,
    /// What was read cannot be decoded, or an answer breaks the protocol: a bug or corrupt data.
    Corrupt,
    /// A definition file of `streams/` is invalid.
    Definition,
}

impl ErrorKind {
    /// Whether the same operation may succeed if tried again (after re-reading, for a
    /// [`ErrorKind::Conflict`]): the failure is of the moment, not of the request.
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorKind::Disconnected
            | ErrorKind::TimedOut
            | ErrorKind::NoResponders
            | ErrorKind::Unavailable
            | ErrorKind::NotFound
            | ErrorKind::Conflict => true,
            ErrorKind::Rejected | ErrorKind::Corrupt | ErrorKind::Definition => false,
        }
    }
}

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::Error,
    },
    /// Another writer appended to the chat first (expected-last-subject-sequence failed).
    #[error("chat {chat_id} was written concurrently")]
    Conflict { chat_id: String },
    /// Something held by one writer at a time (a lease) kept changing hands.
    #[error("{what}")]
    Contended { what: String },
    #[error("invalid definition {file}: {reason}")]
    Definition { file: String, reason: String },
    /// A core NATS operation (publish, subscribe, request, flush) failed.
    #[error("{op}: {source}")]
    Nats {
        op: String,
        kind: ErrorKind,
        #[source]
        source: async_nats::Error,
    },
    /// A JetStream API operation (on a stream or consumer, a publish's acknowledgement, a direct
    /// get: the requests on `$JS.API`) failed.
    #[error("{op}: {source}")]
    JetStream {
        op: String,
        kind: ErrorKind,
        #[source]
        source: async_nats::Error,
    },
    /// A key-value bucket operation failed.
    #[error("{op}: {source}")]
    Kv {
        op: String,
        kind: ErrorKind,
        #[source]
        source: async_nats::Error,
    },
    /// A read did not finish in time.
    #[error("{op} timed out")]
    TimedOut { op: String },
    /// A subscription or message stream ended before the answer was complete.
    #[error("{op}: ended early")]
    Ended { op: String },
    /// An answer of the server that breaks the protocol (a header it always sends is missing).
    #[error("{op}: {what}")]
    Malformed { op: String, what: String },
    #[error(transparent)]
    Codec(#[from] mozaiks_events::Error),
}

impl Error {
    /// A failure of a core NATS operation, `op` saying what was being done.
    pub fn nats(op: impl Into<String>, source: impl Into<async_nats::Error>) -> Error {
        let source = source.into();
        Error::Nats {
            op: op.into(),
            kind: classify(source.as_ref()),
            source,
        }
    }

    /// A failure of a JetStream operation, `op` saying what was being done.
    pub fn jetstream(op: impl Into<String>, source: impl Into<async_nats::Error>) -> Error {
        let source = source.into();
        Error::JetStream {
            op: op.into(),
            kind: classify(source.as_ref()),
            source,
        }
    }

    /// A failure of a key-value bucket operation, `op` saying what was being done.
    pub fn kv(op: impl Into<String>, source: impl Into<async_nats::Error>) -> Error {
        let source = source.into();
        Error::Kv {
            op: op.into(),
            kind: classify(source.as_ref()),
            source,
        }
    }

    /// What went wrong, for deciding what to do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { source, .. } => match classify(source.as_ref()) {
                ErrorKind::Rejected => ErrorKind::Rejected,
                _ => ErrorKind::Disconnected,
            },
            Error::Conflict { .. } | Error::Contended { .. } => ErrorKind::Conflict,
            Error::Definition { .. } => ErrorKind::Definition,
            Error::Nats { kind, .. } | Error::JetStream { kind, .. } | Error::Kv { kind, .. } => {
                *kind
            }
            Error::TimedOut { .. } => ErrorKind::TimedOut,
            Error::Ended { .. } => ErrorKind::Disconnected,
            Error::Malformed { .. } => ErrorKind::Corrupt,
            Error::Codec(_) => ErrorKind::Corrupt,
        }
    }

    /// Whether the same operation may succeed if tried again ([`ErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// Whether the failure says something the definitions of `streams/` provide is missing on the
    /// server, or JetStream is not answering yet: a reason to [`Bus::heal`](crate::Bus::heal).
    pub fn is_missing(&self) -> bool {
        matches!(self.kind(), ErrorKind::NotFound | ErrorKind::NoResponders)
    }
}

/// The kind of any error from async-nats (or wrapping one): the first decisive kind in its source
/// chain, [`ErrorKind::Unavailable`] when none is.
pub fn kind_of(e: &(dyn StdError + 'static)) -> ErrorKind {
    classify(e)
}

/// Whether `e` (an async-nats error, or one wrapping it) says something the definitions provide
/// is missing or JetStream is not answering yet (see [`Error::is_missing`]).
pub fn is_missing_in(e: &(dyn StdError + 'static)) -> bool {
    if let Some(bus) = e.downcast_ref::<Error>() {
        return bus.is_missing();
    }
    matches!(classify(e), ErrorKind::NotFound | ErrorKind::NoResponders)
}

fn classify(e: &(dyn StdError + 'static)) -> ErrorKind {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(kind) = decisive(err) {
            return kind;
        }
        next = err.source();
    }
    ErrorKind::Unavailable
}

/// A JetStream API error by its codes: the two wrong-last-sequence codes are a conflict, then the
/// HTTP-like status decides.
fn api(e: &jetstream::Error) -> ErrorKind {
    if crate::is_wrong_last_sequence(e) {
        return ErrorKind::Conflict;
    }
    match e.code() {
        404 => ErrorKind::NotFound,
        408 | 504 => ErrorKind::TimedOut,
        400..=499 => ErrorKind::Rejected,
        _ => ErrorKind::Unavailable,
    }
}

/// Maps an async-nats error kind to ours; `None` sends the classification on to the source (the
/// kind only says which step failed, like `Request` or `Other`).
trait Decide {
    fn decide(&self) -> Option<ErrorKind>;
}

/// The kind of `e` itself, if its type says it; `None` to look at its source.
fn decisive(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    if let Some(api_error) = e.downcast_ref::<jetstream::Error>() {
        return Some(api(api_error));
    }
    if let Some(bus) = e.downcast_ref::<Error>() {
        return Some(bus.kind());
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return Some(match io.kind() {
            std::io::ErrorKind::TimedOut => ErrorKind::TimedOut,
            _ => ErrorKind::Disconnected,
        });
    }
    if e.is::<serde_json::Error>() || e.is::<mozaiks_events::Error>() {
        return Some(ErrorKind::Corrupt);
    }
    macro_rules! by_kind {
        ($($kind:ty),* $(,)?) => {
            $(
                if let Some(e) = e.downcast_ref::<async_nats::error::Error<$kind>>() {
                    return e.kind().decide();
                }
            )*
        };
    }
    use async_nats::client as core;
    use jetstream::consumer::{StreamErrorKind, pull};
    use jetstream::{context as ctx, kv, message, stream};
    by_kind!(
        async_nats::ConnectErrorKind,
        core::PublishErrorKind,
        core::SubscribeErrorKind,
        core::RequestErrorKind,
        core::FlushErrorKind,
        ctx::PublishErrorKind,
        ctx::RequestErrorKind,
        ctx::ConsumerInfoErrorKind,
        ctx::CreateStreamErrorKind,
        ctx::GetStreamErrorKind,
        ctx::GetStreamByNameErrorKind,
        ctx::KeyValueErrorKind,
        ctx::CreateKeyValueErrorKind,
        ctx::UpdateKeyValueErrorKind,
        ctx::ObjectStoreErrorKind,
        ctx::AccountErrorKind,
        stream::DirectGetErrorKind,
        stream::LastRawMessageErrorKind,
        stream::ConsumerErrorKind,
        stream::DeleteMessageErrorKind,
        stream::PurgeErrorKind,
        StreamErrorKind,
        pull::MessagesErrorKind,
        pull::OrderedErrorKind,
        pull::BatchErrorKind,
        pull::BatchRequestErrorKind,
        kv::CreateErrorKind,
        kv::PutErrorKind,
        kv::EntryErrorKind,
        kv::WatchErrorKind,
        kv::UpdateErrorKind,
        kv::WatcherErrorKind,
        kv::StatusErrorKind,
        message::StreamMessageErrorKind,
    );
    None
}

use ErrorKind::{
    Conflict, Corrupt, Disconnected, NoResponders, NotFound, Rejected, TimedOut, Unavailable,
};

impl Decide for async_nats::ConnectErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use async_nats::ConnectErrorKind as K;
        Some(match self {
            K::TimedOut => TimedOut,
            K::ServerParse | K::Authentication | K::AuthorizationViolation | K::Tls => Rejected,
            K::Dns | K::Io | K::MaxReconnects => Disconnected,
        })
    }
}

impl Decide for async_nats::client::PublishErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use async_nats::client::PublishErrorKind as K;
        Some(match self {
            K::MaxPayloadExceeded | K::InvalidSubject => Rejected,
            K::Send => Disconnected,
        })
    }
}

impl Decide for async_nats::client::SubscribeErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use async_nats::client::SubscribeErrorKind as K;
        match self {
            K::InvalidSubject | K::InvalidQueueName => Some(Rejected),
            K::Other => None,
        }
    }
}

impl Decide for async_nats::client::RequestErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use async_nats::client::RequestErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::NoResponders => Some(NoResponders),
            K::InvalidSubject | K::MaxPayloadExceeded => Some(Rejected),
            K::Other => None,
        }
    }
}

impl Decide for async_nats::client::FlushErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        Some(Disconnected)
    }
}

impl Decide for jetstream::context::PublishErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::PublishErrorKind as K;
        match self {
            K::StreamNotFound => Some(NotFound),
            K::WrongLastMessageId | K::WrongLastSequence => Some(Conflict),
            K::TimedOut => Some(TimedOut),
            K::BrokenPipe => Some(Disconnected),
            K::MaxAckPending => Some(Unavailable),
            K::MaxPayloadExceeded => Some(Rejected),
            // 10164 (wrong last sequence, no number) among them: the source decides.
            K::Other => None,
        }
    }
}

impl Decide for jetstream::context::RequestErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::RequestErrorKind as K;
        match self {
            K::NoResponders => Some(NoResponders),
            K::TimedOut => Some(TimedOut),
            K::InvalidSubject => Some(Rejected),
            K::Other => None,
        }
    }
}

impl Decide for jetstream::context::ConsumerInfoErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::ConsumerInfoErrorKind as K;
        match self {
            K::InvalidName => Some(Rejected),
            K::Offline => Some(Unavailable),
            K::NotFound | K::StreamNotFound => Some(NotFound),
            K::JetStream(e) => Some(api(e)),
            K::TimedOut => Some(TimedOut),
            K::NoResponders => Some(NoResponders),
            K::Request => None,
        }
    }
}

impl Decide for jetstream::context::CreateStreamErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::CreateStreamErrorKind as K;
        match self {
            K::EmptyStreamName | K::InvalidStreamName | K::DomainAndExternalSet => Some(Rejected),
            K::JetStreamUnavailable => Some(Unavailable),
            K::JetStream(e) => Some(api(e)),
            K::TimedOut => Some(TimedOut),
            K::NotFound => Some(NotFound),
            K::ResponseParse => Some(Corrupt),
            K::Response => None,
        }
    }
}

impl Decide for jetstream::context::GetStreamErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::GetStreamErrorKind as K;
        match self {
            K::EmptyName | K::InvalidStreamName => Some(Rejected),
            K::JetStream(e) => Some(api(e)),
            K::Request => None,
        }
    }
}

impl Decide for jetstream::context::GetStreamByNameErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::GetStreamByNameErrorKind as K;
        match self {
            K::NotFound => Some(NotFound),
            K::InvalidSubject => Some(Rejected),
            K::JetStream(e) => Some(api(e)),
            K::Request => None,
        }
    }
}

impl Decide for jetstream::context::KeyValueErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::KeyValueErrorKind as K;
        match self {
            K::InvalidStoreName => Some(Rejected),
            K::GetBucket | K::JetStream => None,
        }
    }
}

impl Decide for jetstream::context::CreateKeyValueErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::CreateKeyValueErrorKind as K;
        match self {
            K::InvalidStoreName | K::TooLongHistory | K::LimitMarkersNotSupported => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::JetStream | K::BucketCreate => None,
        }
    }
}

impl Decide for jetstream::context::UpdateKeyValueErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::UpdateKeyValueErrorKind as K;
        match self {
            K::InvalidStoreName | K::TooLongHistory | K::LimitMarkersNotSupported => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::NotFound => Some(NotFound),
            K::JetStream | K::BucketUpdate => None,
        }
    }
}

impl Decide for jetstream::context::ObjectStoreErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::ObjectStoreErrorKind as K;
        match self {
            K::InvalidBucketName => Some(Rejected),
            K::GetStore => None,
        }
    }
}

impl Decide for jetstream::context::AccountErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::context::AccountErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::JetStream(e) => Some(api(e)),
            K::JetStreamUnavailable => Some(Unavailable),
            K::Other => None,
        }
    }
}

impl Decide for jetstream::stream::DirectGetErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::stream::DirectGetErrorKind as K;
        match self {
            K::NotFound => Some(NotFound),
            K::InvalidSubject => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::ErrorResponse(status, _) => Some(match status.as_u16() {
                404 => NotFound,
                408 | 504 => TimedOut,
                400..=499 => Rejected,
                _ => Unavailable,
            }),
            K::Request | K::Other => None,
        }
    }
}

impl Decide for jetstream::stream::LastRawMessageErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::stream::LastRawMessageErrorKind as K;
        match self {
            K::NoMessageFound => Some(NotFound),
            K::InvalidSubject => Some(Rejected),
            K::JetStream(e) => Some(api(e)),
            K::Other => None,
        }
    }
}

impl Decide for jetstream::stream::ConsumerErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::stream::ConsumerErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::InvalidConsumerType | K::InvalidName => Some(Rejected),
            K::JetStream(e) => Some(api(e)),
            K::Request | K::Other => None,
        }
    }
}

impl Decide for jetstream::stream::DeleteMessageErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::stream::DeleteMessageErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::JetStream(e) => Some(api(e)),
            K::Request => None,
        }
    }
}

impl Decide for jetstream::stream::PurgeErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::stream::PurgeErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::JetStream(e) => Some(api(e)),
            K::Request => None,
        }
    }
}

impl Decide for jetstream::consumer::StreamErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::consumer::StreamErrorKind as K;
        match self {
            K::TimedOut => Some(TimedOut),
            K::Other => None,
        }
    }
}

impl Decide for jetstream::consumer::pull::MessagesErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::consumer::pull::MessagesErrorKind as K;
        match self {
            K::MissingHeartbeat => Some(Disconnected),
            K::ConsumerDeleted => Some(NotFound),
            K::NoResponders => Some(NoResponders),
            K::PushBasedConsumer | K::RequestLimitExceeded => Some(Rejected),
            K::Pull | K::Other => None,
        }
    }
}

impl Decide for jetstream::consumer::pull::OrderedErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::consumer::pull::OrderedErrorKind as K;
        match self {
            K::MissingHeartbeat => Some(Disconnected),
            K::ConsumerDeleted => Some(NotFound),
            K::NoResponders => Some(NoResponders),
            K::PushBasedConsumer | K::RequestLimitExceeded => Some(Rejected),
            K::Pull | K::Recreate | K::Other => None,
        }
    }
}

impl Decide for jetstream::consumer::pull::BatchErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::consumer::pull::BatchErrorKind as K;
        match self {
            K::Flush => Some(Disconnected),
            K::Serialize => Some(Corrupt),
            _ => None,
        }
    }
}

impl Decide for jetstream::consumer::pull::BatchRequestErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::consumer::pull::BatchRequestErrorKind as K;
        match self {
            K::Flush => Some(Disconnected),
            K::Serialize => Some(Corrupt),
            K::Publish => None,
        }
    }
}

impl Decide for jetstream::kv::CreateErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::CreateErrorKind as K;
        match self {
            K::AlreadyExists => Some(Conflict),
            K::InvalidKey => Some(Rejected),
            K::Publish | K::Ack | K::Other => None,
        }
    }
}

impl Decide for jetstream::kv::PutErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::PutErrorKind as K;
        match self {
            K::InvalidKey => Some(Rejected),
            K::Publish | K::Ack => None,
        }
    }
}

impl Decide for jetstream::kv::EntryErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::EntryErrorKind as K;
        match self {
            K::InvalidKey => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::Other => None,
        }
    }
}

impl Decide for jetstream::kv::WatchErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::WatchErrorKind as K;
        match self {
            K::InvalidKey => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::ConsumerCreate | K::Other => None,
        }
    }
}

impl Decide for jetstream::kv::UpdateErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::UpdateErrorKind as K;
        match self {
            K::InvalidKey => Some(Rejected),
            K::TimedOut => Some(TimedOut),
            K::WrongLastRevision => Some(Conflict),
            // A revision check that failed arrives as `Other` with the publish error as source.
            K::Other => None,
        }
    }
}

impl Decide for jetstream::kv::WatcherErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        None
    }
}

impl Decide for jetstream::kv::StatusErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        use jetstream::kv::StatusErrorKind as K;
        match self {
            K::JetStream(e) => Some(api(e)),
            K::TimedOut => Some(TimedOut),
        }
    }
}

impl Decide for jetstream::message::StreamMessageErrorKind {
    fn decide(&self) -> Option<ErrorKind> {
        Some(Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
    use async_nats::jetstream::context::{
        GetStreamError, GetStreamErrorKind, PublishError, PublishErrorKind, RequestError,
        RequestErrorKind,
    };
    use async_nats::jetstream::kv::{UpdateError, UpdateErrorKind};

    use super::*;

    /// A JetStream API error as nats-server sends it.
    fn api_error(status: u16, code: u64, description: &str) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": status, "err_code": code, "description": description
        }))
        .expect("a JetStream API error")
    }

    #[test]
    fn kinds_come_from_the_async_nats_kinds_and_the_api_codes() {
        let not_found = GetStreamError::new(GetStreamErrorKind::JetStream(api_error(
            404,
            10059,
            "stream not found",
        )));
        let e = Error::jetstream("open MZ_EVT", not_found);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.is_missing() && e.is_retryable());

        let timed_out = Error::jetstream(
            "read the chat",
            GetStreamError::with_source(
                GetStreamErrorKind::Request,
                RequestError::new(RequestErrorKind::TimedOut),
            ),
        );
        assert_eq!(timed_out.kind(), ErrorKind::TimedOut);
        assert!(timed_out.is_retryable() && !timed_out.is_missing());

        let no_js = Error::jetstream("ping", RequestError::new(RequestErrorKind::NoResponders));
        assert_eq!(no_js.kind(), ErrorKind::NoResponders);
        assert!(no_js.is_missing());

        let unavailable = Error::jetstream(
            "create stream",
            GetStreamError::new(GetStreamErrorKind::JetStream(api_error(
                503,
                10008,
                "JetStream system temporarily unavailable",
            ))),
        );
        assert_eq!(unavailable.kind(), ErrorKind::Unavailable);
        assert!(unavailable.is_retryable());

        let invalid = Error::jetstream(
            "update stream",
            GetStreamError::new(GetStreamErrorKind::JetStream(api_error(
                400,
                10065,
                "subjects overlap with an existing stream",
            ))),
        );
        assert_eq!(invalid.kind(), ErrorKind::Rejected);
        assert!(!invalid.is_retryable());

        let deleted = Error::jetstream(
            "fetch",
            MessagesError::new(MessagesErrorKind::ConsumerDeleted),
        );
        assert!(deleted.is_missing());
    }

    #[test]
    fn a_wrong_last_sequence_deep_in_the_chain_is_a_conflict() {
        let update = UpdateError::with_source(
            UpdateErrorKind::Other,
            PublishError::with_source(
                PublishErrorKind::Other,
                api_error(400, 10164, "wrong last sequence"),
            ),
        );
        let e = Error::kv("renew lease x", update);
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.is_retryable() && !e.is_missing());
        // The source is kept: the conflict is still found by its code.
        assert!(crate::wrong_last_sequence_in(&e));
        assert!(e.to_string().starts_with("renew lease x: "), "{e}");
    }

    #[test]
    fn kinds_of_the_errors_without_a_nats_source() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s");
        let connect = Error::Connect {
            url: "nats://x:4222".into(),
            source: io.into(),
        };
        assert_eq!(connect.kind(), ErrorKind::Disconnected);
        assert!(connect.is_retryable());
        let broken = Error::Malformed {
            op: "batch get".into(),
            what: "no Nats-Sequence".into(),
        };
        assert_eq!(broken.kind(), ErrorKind::Corrupt);
        assert!(!broken.is_retryable());
        assert_eq!(
            Error::TimedOut {
                op: "replay".into()
            }
            .kind(),
            ErrorKind::TimedOut
        );
        assert_eq!(
            Error::Ended {
                op: "replay".into()
            }
            .kind(),
            ErrorKind::Disconnected
        );
        assert_eq!(
            Error::Conflict {
                chat_id: "c".into()
            }
            .kind(),
            ErrorKind::Conflict
        );
        let codec = Error::Codec(mozaiks_events::Error::InvalidId {
            what: "x",
            reason: "y".into(),
        });
        assert_eq!(codec.kind(), ErrorKind::Corrupt);
        assert!(!codec.is_retryable());
        // Unknown failures stay retryable, as every failure was before kinds.
        let other = Error::nats("flush", std::fmt::Error);
        assert_eq!(other.kind(), ErrorKind::Unavailable);
        assert!(other.is_retryable());
    }

    #[test]
    fn is_missing_in_looks_through_wrappers() {
        let e = Error::jetstream(
            "consumer",
            MessagesError::new(MessagesErrorKind::ConsumerDeleted),
        );
        let wrapped: Box<dyn StdError + Send + Sync> = Box::new(e);
        assert!(is_missing_in(wrapped.as_ref()));
        let timed_out = RequestError::new(RequestErrorKind::TimedOut);
        assert!(!is_missing_in(&timed_out));
    }
}
