//! Topic filters (MQTT 5 §4.7, 3.1.1 §4.7): their syntax, shared subscriptions
//! (`$share/{group}/{filter}`, MQTT 5 §4.8.2) and matching a topic name against a filter.
//!
//! The decoder has already refused what closes a connection (an empty filter, U+0000, bad
//! UTF-8); what is left here is answered per filter in the SUBACK (MQTT 5 0x8F, 3.1.1 0x80).

/// Why a filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("a topic filter must not be empty")]
    Empty,
    #[error("`#` must be the whole last level")]
    MultiLevel,
    #[error("`+` must be a whole level")]
    SingleLevel,
    #[error("a shared subscription needs a group name without `/`, `+` or `#`, then a filter")]
    Share,
}

/// A filter as subscribed: which shared group it belongs to, if any, and the filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub share: Option<&'a str>,
    pub filter: &'a str,
}

/// Checks a filter's syntax and splits off its shared-subscription group.
pub fn parse(text: &str) -> Result<Parsed<'_>, FilterError> {
    let (share, filter) = match text.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(FilterError::Share)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(FilterError::Share);
            }
            (Some(group), filter)
        }
        // `$share` alone, or `$share/` with nothing after it.
        None if text == "$share" => return Err(FilterError::Share),
        None => (None, text),
    };
    check(filter)?;
    Ok(Parsed { share, filter })
}

/// The syntax of a filter without its `$share/{group}/` prefix.
pub fn check(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(FilterError::MultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(FilterError::SingleLevel);
        }
    }
    Ok(())
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter without a share
/// prefix). A topic starting with `$` is not matched by a filter starting with a wildcard
/// [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            // `#` also matches the parent level itself: `a/#` matches `a` [MQTT-4.7.1-2].
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic `inner` can match is also matched by `outer` (both valid filters
/// without share prefixes): a subscription to `inner` stays within a right to `outer`.
pub fn covers(outer: &str, inner: &str) -> bool {
    // A leading wildcard never matches a `$` topic, so it cannot cover a `$` filter.
    if inner.starts_with('$') && outer.starts_with(['+', '#']) {
        return false;
    }
    let mut inner_levels = inner.split('/');
    for level in outer.split('/') {
        match (level, inner_levels.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some(i)) => {
                if i == "#" {
                    return false;
                }
            }
            (literal, Some(i)) => {
                if literal != i {
                    return false;
                }
            }
        }
    }
    inner_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax_follows_4_7_1() {
        for good in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "sport/tennis/+",
            "$SYS/#",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        // [MQTT-4.7.1-1] `#` last and alone; [MQTT-4.7.1-2] `+` alone in its level.
        assert_eq!(check("a/#/b"), Err(FilterError::MultiLevel));
        assert_eq!(check("a#"), Err(FilterError::MultiLevel));
        assert_eq!(check("a/b#"), Err(FilterError::MultiLevel));
        assert_eq!(check("a+"), Err(FilterError::SingleLevel));
        assert_eq!(check("a/+b/c"), Err(FilterError::SingleLevel));
        assert_eq!(check(""), Err(FilterError::Empty));
    }

    #[test]
    fn shared_subscriptions_follow_4_8_2() {
        assert_eq!(
            parse("$share/g1/a/+"),
            Ok(Parsed {
                share: Some("g1"),
                filter: "a/+"
            })
        );
        assert_eq!(
            parse("a/b"),
            Ok(Parsed {
                share: None,
                filter: "a/b"
            })
        );
        // [MQTT-4.8.2-1] a share name of at least one character, without `/`, `+` or `#`;
        // [MQTT-4.8.2-2] followed by `/` and a topic filter.
        for bad in [
            "$share",
            "$share/",
            "$share/g1",
            "$share/g1/",
            "$share//a",
            "$share/g+/a",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("$share/g/a/#/b"), Err(FilterError::MultiLevel));
    }

    #[test]
    fn matching_follows_4_7() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            // [MQTT-4.7.2-1] wildcards at the start do not match `$` topics.
            ("#", "$SYS/uptime", false),
            ("+/uptime", "$SYS/uptime", false),
            ("$SYS/#", "$SYS/uptime", true),
            ("$SYS/+", "$SYS/uptime", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} ~ {topic}");
        }
    }

    #[test]
    fn a_right_covers_only_narrower_filters() {
        let cases = [
            ("#", "a/b", true),
            ("#", "#", true),
            ("a/#", "a", true),
            ("a/#", "a/+/c", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b/c", false),
            ("a/b", "a/+", false),
            ("a/b", "a/b", true),
            ("devices/dev1/cmd", "devices/dev1/cmd/x", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
        ];
        for (outer, inner, expected) in cases {
            assert_eq!(covers(outer, inner), expected, "{outer} ⊇ {inner}");
        }
    }

    #[test]
    fn matching_agrees_with_covering_on_topics() {
        // A topic name is the narrowest filter: covering it is matching it.
        let filters = ["#", "a/#", "a/+", "+/b", "a/b", "+", "+/+/c", "$SYS/#"];
        let topics = ["a", "a/b", "a/c", "x/b", "a/b/c", "$SYS/b", "/b", "a/"];
        for f in filters {
            for t in topics {
                assert_eq!(matches(f, t), covers(f, t), "{f} vs {t}");
            }
        }
    }
}
