//! What to do with a record Kafka did not take.
//!
//! With `message.timeout.ms=0` librdkafka retries retriable errors (broker down, leader
//! change, not enough replicas, request timeouts) by itself, in order, forever. So a failed
//! delivery report means librdkafka gave up: the error is permanent for the record, for its
//! batch, or for the producer instance. Each case has its own remedy.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::types::RDKafkaErrorCode as Code;
use tokio::time::Instant;

/// The remedy for a failed send or delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Nothing is wrong with the record: send it again after a back-off.
    Retry,
    /// The broker refused the whole batch for a reason that belongs to one record (too
    /// large, invalid, bad timestamp). Send this record again alone to learn whether it is
    /// the culprit.
    Isolate,
    /// The record can never be delivered: move it to the dead-letter log.
    DeadLetter,
    /// The producer instance is unusable (fatal idempotence error, fenced): build a new
    /// one and send everything in flight again, in order.
    Rebuild,
}

/// Remedy for an error in a delivery report. `alone` says whether the record was already
/// sent in a batch of its own.
pub fn delivery(code: Code, alone: bool) -> Disposition {
    match code {
        Code::MessageSizeTooLarge
        | Code::InvalidRecord
        | Code::InvalidTimestamp
        | Code::InvalidMessage
        | Code::InvalidMessageSize
        | Code::MessageBatchTooLarge
        | Code::UnsupportedForMessageFormat
        | Code::PolicyViolation => {
            if alone {
                Disposition::DeadLetter
            } else {
                Disposition::Isolate
            }
        }
        // These concern the topic, so every record in the batch truly has the problem.
        Code::TopicAuthorizationFailed
        | Code::UnknownTopic
        | Code::UnknownPartition
        | Code::UnknownTopicOrPartition
        | Code::InvalidTopic => Disposition::DeadLetter,
        Code::Fatal
        | Code::ProducerFenced
        | Code::Fenced
        | Code::InvalidProducerEpoch
        | Code::InvalidProducerIdMapping
        | Code::OutOfOrderSequenceNumber
        | Code::UnknownProducerId
        | Code::ClusterAuthorizationFailed => Disposition::Rebuild,
        // Timeouts and purges only happen when librdkafka is told to give up (shutdown, a
        // rebuild); anything unknown is retried rather than dropped: the log is the buffer.
        _ => Disposition::Retry,
    }
}

/// Remedy for an error returned by `send` itself, before librdkafka took the record. These
/// concern this one record (librdkafka checks size and topic locally), so no isolation is
/// needed.
pub fn enqueue(code: Code) -> Disposition {
    match code {
        Code::MessageSizeTooLarge
        | Code::InvalidMessageSize
        | Code::UnknownTopic
        | Code::UnknownPartition
        | Code::InvalidTopic
        | Code::InvalidArgument
        | Code::TopicAuthorizationFailed => Disposition::DeadLetter,
        Code::Fatal => Disposition::Rebuild,
        // QueueFull and anything transient: back off and send again, in order.
        _ => Disposition::Retry,
    }
}

/// How long records for a topic Kafka says it does not know are sent again before they go
/// to the dead-letter log, from the first such answer for the topic.
///
/// librdkafka gives a topic 30 s to appear (`topic.metadata.propagation.max.ms`: the
/// brokers' auto-creation, or a topic just created elsewhere), but counts them from the
/// topic's first use. A route's topic first used while Kafka was away for longer had no
/// time left when Kafka returned: the first "unknown topic" answer failed the backlog
/// before the brokers' auto-creation (which that very request started) had made the topic,
/// and it went to the dead-letter log (a CI run met it). The grace counts from the answer
/// instead; librdkafka asks again for a topic it does not know every second, so a topic
/// being made is known within a second or two of the first answer.
pub const UNKNOWN_TOPIC_GRACE: Duration = Duration::from_secs(30);

/// Topics given the grace at once at most; others refused as unknown meanwhile are
/// dead-lettered at once, as before there was a grace, so a flood of routes to topics that
/// do not exist cannot grow the map.
const UNKNOWN_TOPICS_HELD: usize = 1024;

/// Kafka does not know the record's topic (it may be being made).
pub fn is_unknown_topic(code: Code) -> bool {
    matches!(code, Code::UnknownTopic | Code::UnknownTopicOrPartition)
}

/// Topics Kafka answered "unknown topic" for, with when it first did: see
/// [`UNKNOWN_TOPIC_GRACE`]. A topic stays until a record for it is delivered, so one that
/// does not exist gets its grace once, and its records are dead-lettered at once after.
#[derive(Debug, Default)]
pub struct UnknownTopics {
    since: HashMap<String, Instant>,
}

impl UnknownTopics {
    /// Whether a record for `topic`, refused at `now` as an unknown topic, is sent again
    /// (within the grace) rather than dead-lettered. The grace counts Kafka's answers:
    /// while the link is down (`link_up` false; librdkafka refuses a topic it marked unknown
    /// by itself, without asking) it starts again, so the brokers get the whole of it once
    /// they answer.
    pub fn waits(&mut self, topic: &str, now: Instant, link_up: bool) -> bool {
        let held = self.since.len();
        let since = match self.since.get_mut(topic) {
            Some(since) if !link_up => {
                *since = now;
                now
            }
            Some(&mut since) => since,
            None if held >= UNKNOWN_TOPICS_HELD => return false,
            None => {
                tracing::warn!(
                    topic,
                    grace = ?UNKNOWN_TOPIC_GRACE,
                    "Kafka does not know a route's topic (the brokers may be making it); its records are sent again until it exists, and dead-lettered if it still does not after the grace."
                );
                self.since.insert(topic.to_owned(), now);
                now
            }
        };
        now.saturating_duration_since(since) < UNKNOWN_TOPIC_GRACE
    }

    /// Kafka took a record for `topic`: it exists.
    pub fn known(&mut self, topic: &str) {
        if !self.since.is_empty() {
            self.since.remove(topic);
        }
    }

    /// [`delivery`], with a topic within its grace sent again.
    pub fn delivery(
        &mut self,
        code: Code,
        alone: bool,
        topic: &str,
        now: Instant,
        link_up: bool,
    ) -> Disposition {
        if is_unknown_topic(code) && self.waits(topic, now, link_up) {
            return Disposition::Retry;
        }
        delivery(code, alone)
    }

    /// [`enqueue`], with a topic within its grace sent again.
    pub fn enqueue(&mut self, code: Code, topic: &str, now: Instant, link_up: bool) -> Disposition {
        if is_unknown_topic(code) && self.waits(topic, now, link_up) {
            return Disposition::Retry;
        }
        enqueue(code)
    }
}

/// A bounded label for the `kind` of an error in metrics.
pub fn kind(code: Code) -> &'static str {
    match code {
        Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge => {
            "too_large"
        }
        Code::InvalidRecord
        | Code::InvalidTimestamp
        | Code::InvalidMessage
        | Code::UnsupportedForMessageFormat
        | Code::PolicyViolation => "invalid_record",
        Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed => "not_authorized",
        Code::UnknownTopic
        | Code::UnknownPartition
        | Code::UnknownTopicOrPartition
        | Code::InvalidTopic => "unknown_topic",
        Code::Fatal
        | Code::ProducerFenced
        | Code::Fenced
        | Code::InvalidProducerEpoch
        | Code::InvalidProducerIdMapping
        | Code::OutOfOrderSequenceNumber
        | Code::UnknownProducerId => "fatal",
        Code::QueueFull => "queue_full",
        code if is_timeout(code) => "timeout",
        Code::PurgeQueue | Code::PurgeInflight => "purged",
        Code::BrokerTransportFailure | Code::AllBrokersDown | Code::Resolve => "transport",
        Code::Authentication | Code::SaslAuthenticationFailed | Code::SSL => "authentication",
        _ => "other",
    }
}

/// Errors from librdkafka's error callback that mean the brokers refused the gateway itself:
/// its TLS handshake or its SASL credentials. A missing client certificate is not among them:
/// the broker then closes the connection, which librdkafka reports as a transport failure
/// (with the TLS alert in the reason).
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::Authentication | Code::SaslAuthenticationFailed | Code::SSL
    )
}

/// A request or a record timed out: the brokers did not answer in time, and may have taken
/// it after all.
pub fn is_timeout(code: Code) -> bool {
    matches!(
        code,
        Code::MessageTimedOut | Code::RequestTimedOut | Code::OperationTimedOut
    )
}

/// Errors from librdkafka's error callback that mean "no usable connection to Kafka".
pub fn is_link_error(code: Code) -> bool {
    matches!(
        code,
        Code::AllBrokersDown
            | Code::BrokerTransportFailure
            | Code::Resolve
            | Code::Authentication
            | Code::SaslAuthenticationFailed
            | Code::SSL
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_level_errors_isolate_first_then_dead_letter() {
        for code in [
            Code::MessageSizeTooLarge,
            Code::InvalidRecord,
            Code::InvalidTimestamp,
        ] {
            assert_eq!(delivery(code, false), Disposition::Isolate, "{code:?}");
            assert_eq!(delivery(code, true), Disposition::DeadLetter, "{code:?}");
        }
    }

    #[test]
    fn topic_errors_dead_letter_at_once() {
        for code in [
            Code::TopicAuthorizationFailed,
            Code::UnknownTopic,
            Code::InvalidTopic,
        ] {
            assert_eq!(delivery(code, false), Disposition::DeadLetter, "{code:?}");
        }
    }

    #[test]
    fn transient_and_unknown_errors_retry() {
        for code in [
            Code::MessageTimedOut,
            Code::PurgeQueue,
            Code::PurgeInflight,
            Code::NotEnoughReplicas,
            Code::RequestTimedOut,
            Code::Unknown,
        ] {
            assert_eq!(delivery(code, false), Disposition::Retry, "{code:?}");
        }
        assert_eq!(enqueue(Code::QueueFull), Disposition::Retry);
    }

    #[test]
    fn fatal_errors_rebuild_the_producer() {
        for code in [
            Code::Fatal,
            Code::ProducerFenced,
            Code::OutOfOrderSequenceNumber,
        ] {
            assert_eq!(delivery(code, false), Disposition::Rebuild, "{code:?}");
        }
        assert_eq!(enqueue(Code::Fatal), Disposition::Rebuild);
    }

    #[test]
    fn local_rejections_need_no_isolation() {
        assert_eq!(enqueue(Code::MessageSizeTooLarge), Disposition::DeadLetter);
        assert_eq!(enqueue(Code::UnknownTopic), Disposition::DeadLetter);
    }

    /// A topic Kafka does not know yet is given its grace from the first answer, then its
    /// records are dead-lettered; a delivery for it starts the grace afresh next time. Other
    /// topic errors and other topics are not affected.
    #[test]
    fn an_unknown_topic_is_sent_again_within_its_grace() {
        let mut unknown = UnknownTopics::default();
        let t0 = Instant::now();
        for code in [Code::UnknownTopic, Code::UnknownTopicOrPartition] {
            assert_eq!(
                unknown.delivery(code, false, "a", t0, true),
                Disposition::Retry
            );
        }
        assert_eq!(
            unknown.enqueue(Code::UnknownTopic, "a", t0 + Duration::from_secs(29), true),
            Disposition::Retry
        );
        let after = t0 + UNKNOWN_TOPIC_GRACE;
        assert_eq!(
            unknown.enqueue(Code::UnknownTopic, "a", after, true),
            Disposition::DeadLetter
        );
        assert_eq!(
            unknown.delivery(Code::UnknownTopic, false, "a", after, true),
            Disposition::DeadLetter
        );
        assert_eq!(
            unknown.delivery(Code::UnknownTopic, false, "b", after, true),
            Disposition::Retry,
            "each topic has its own grace"
        );
        assert_eq!(
            unknown.delivery(Code::TopicAuthorizationFailed, false, "c", t0, true),
            Disposition::DeadLetter
        );
        assert_eq!(
            unknown.enqueue(Code::QueueFull, "c", t0, true),
            Disposition::Retry
        );
        unknown.known("a");
        assert_eq!(
            unknown.enqueue(Code::UnknownTopic, "a", after, true),
            Disposition::Retry,
            "delivered since: a new grace"
        );
        // Refused while the link is down: librdkafka's own verdict, not the brokers'. The
        // grace starts again, and counts from the last such refusal once Kafka answers.
        let later = after + Duration::from_secs(100);
        assert_eq!(
            unknown.enqueue(Code::UnknownTopic, "a", later, false),
            Disposition::Retry
        );
        assert_eq!(
            unknown.enqueue(
                Code::UnknownTopic,
                "a",
                later + Duration::from_secs(29),
                true
            ),
            Disposition::Retry
        );
        assert_eq!(
            unknown.enqueue(Code::UnknownTopic, "a", later + UNKNOWN_TOPIC_GRACE, true),
            Disposition::DeadLetter
        );
    }

    #[test]
    fn the_unknown_topics_held_are_bounded() {
        let mut unknown = UnknownTopics::default();
        let now = Instant::now();
        for i in 0..UNKNOWN_TOPICS_HELD {
            assert!(unknown.waits(&format!("t{i}"), now, true));
        }
        assert!(!unknown.waits("one-more", now, true), "no grace once full");
        assert!(unknown.waits("t0", now, true), "those held keep theirs");
        assert_eq!(unknown.since.len(), UNKNOWN_TOPICS_HELD);
        unknown.known("t0");
        assert!(unknown.waits("one-more", now, true));
    }

    #[test]
    fn kinds_are_bounded() {
        let kinds = [
            Code::MessageSizeTooLarge,
            Code::TopicAuthorizationFailed,
            Code::AllBrokersDown,
            Code::Fatal,
            Code::QueueFull,
            Code::NetworkException,
        ]
        .map(kind);
        assert_eq!(
            kinds,
            [
                "too_large",
                "not_authorized",
                "transport",
                "fatal",
                "queue_full",
                "other"
            ]
        );
    }
}
