//! What to do with a record Kafka did not take.
//!
//! With `message.timeout.ms=0` librdkafka retries retriable errors (broker down, leader
//! change, not enough replicas, request timeouts) by itself, in order, forever. So a failed
//! delivery report means librdkafka gave up: the error is permanent for the record, for its
//! batch, or for the producer instance. Each case has its own remedy.

use rdkafka::types::RDKafkaErrorCode as Code;

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
