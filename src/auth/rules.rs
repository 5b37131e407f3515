//! Topic rights: `[[auth.rules]]` compiled into per-level matchers.
//!
//! Placeholders are filled from the connection's identity and compared *literally* with one
//! topic level, so a client id such as `+` or `#` can never widen a right into a wildcard. A
//! placeholder without a value (no username, no certificate) matches nothing.

use super::config::{Clients, RuleConfig};
use super::{Identity, Kind};
use crate::config::problems::Problems;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    ClientId,
    Username,
    CertCn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// A level of literal text and placeholders.
    Exact(Vec<Part>),
    Single,
    Multi,
}

#[derive(Debug, Clone)]
struct Rule {
    clients: Clients,
    username: Option<String>,
    publish: Vec<Vec<Level>>,
    subscribe: Vec<Vec<Level>>,
}

/// The compiled rules. Empty: everyone may publish and subscribe anywhere. Otherwise: deny
/// by default, publish and subscribe alike.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

impl Rules {
    /// Compiles `rules`, reporting each bad filter under `{path}.rules[i].publish` or
    /// `.subscribe`.
    pub fn new(rules: &[RuleConfig], path: &str, problems: &mut Problems) -> Rules {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{path}.rules[{i}]");
            if rule.publish.is_empty() && rule.subscribe.is_empty() {
                problems.push(
                    format!("{at}.publish"),
                    "lists no topic filter (give `publish`, `subscribe` or both)",
                );
            }
            compiled.push(Rule {
                clients: rule.clients,
                username: rule.username.clone(),
                publish: compile(&rule.publish, &format!("{at}.publish"), problems),
                subscribe: compile(&rule.subscribe, &format!("{at}.subscribe"), problems),
            });
        }
        Rules(compiled)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `identity` may publish to `topic`.
    pub fn may_publish(&self, identity: &Identity, topic: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        self.0.iter().any(|rule| {
            applies(rule, identity)
                && rule
                    .publish
                    .iter()
                    .any(|f| matches(f, &levels, topic, identity))
        })
    }

    /// Whether `identity` may subscribe to `filter` (a valid filter, share prefix removed):
    /// every topic it can match must be within one `subscribe` right.
    pub fn may_subscribe(&self, identity: &Identity, filter: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let levels: Vec<&str> = filter.split('/').collect();
        self.0.iter().any(|rule| {
            applies(rule, identity)
                && rule
                    .subscribe
                    .iter()
                    .any(|f| covers(f, &levels, filter, identity))
        })
    }
}

fn compile(filters: &[String], at: &str, problems: &mut Problems) -> Vec<Vec<Level>> {
    let mut compiled = Vec::with_capacity(filters.len());
    for filter in filters {
        match parse(filter) {
            Ok(levels) => compiled.push(levels),
            Err(e) => problems.push(at.to_owned(), format!("`{filter}`: {e}")),
        }
    }
    compiled
}

/// Whether a right `filter` covers the requested filter `levels`: a requested `+` or `#`
/// is covered only by a right's wildcard at that level, never by a literal or placeholder.
fn covers(filter: &[Level], levels: &[&str], requested: &str, identity: &Identity) -> bool {
    if requested.starts_with('$') && !matches!(filter.first(), Some(Level::Exact(_))) {
        return false;
    }
    for (i, level) in filter.iter().enumerate() {
        let Some(&actual) = levels.get(i) else {
            // `a/#` also covers `a` itself.
            return matches!(level, Level::Multi) && i == levels.len();
        };
        match level {
            Level::Multi => return true,
            Level::Single => {
                if actual == "#" {
                    return false;
                }
            }
            Level::Exact(parts) => {
                if actual == "+" || actual == "#" || !exact(parts, actual, identity) {
                    return false;
                }
            }
        }
    }
    filter.len() == levels.len()
}

fn applies(rule: &Rule, identity: &Identity) -> bool {
    let kind = match rule.clients {
        Clients::Any => true,
        Clients::Anonymous => identity.kind == Kind::Anonymous,
        Clients::Password => identity.username.is_some(),
        Clients::Certificate => identity.kind == Kind::Certificate,
    };
    kind && rule
        .username
        .as_ref()
        .is_none_or(|u| identity.username.as_deref() == Some(u.as_str()))
}

fn matches(filter: &[Level], levels: &[&str], topic: &str, identity: &Identity) -> bool {
    if topic.starts_with('$') && !matches!(filter.first(), Some(Level::Exact(_))) {
        return false;
    }
    for (i, level) in filter.iter().enumerate() {
        match level {
            Level::Multi => return true,
            Level::Single => {
                if levels.get(i).is_none() {
                    return false;
                }
            }
            Level::Exact(parts) => {
                let Some(actual) = levels.get(i) else {
                    return false;
                };
                if !exact(parts, actual, identity) {
                    return false;
                }
            }
        }
    }
    filter.len() == levels.len()
}

/// Compares one level without building a string: each part must be the next piece of it.
fn exact(parts: &[Part], actual: &str, identity: &Identity) -> bool {
    let mut rest = actual;
    for part in parts {
        let piece = match part {
            Part::Literal(s) => s.as_str(),
            Part::Var(Var::ClientId) => identity.client_id.as_str(),
            Part::Var(Var::Username) => match &identity.username {
                Some(u) => u.as_str(),
                None => return false,
            },
            Part::Var(Var::CertCn) => match &identity.cert_cn {
                Some(cn) => cn.as_str(),
                None => return false,
            },
        };
        if matches!(part, Part::Var(_)) && piece.is_empty() {
            return false;
        }
        match rest.strip_prefix(piece) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn parse(filter: &str) -> Result<Vec<Level>, String> {
    if filter.is_empty() {
        return Err("the topic filter is empty".into());
    }
    let parts: Vec<&str> = filter.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "+" => levels.push(Level::Single),
            "#" if i + 1 == parts.len() => levels.push(Level::Multi),
            "#" => return Err("`#` must be the last level".into()),
            p if p.contains(['+', '#']) => {
                return Err(format!("level `{p}`: a wildcard must fill its whole level"));
            }
            p => levels.push(Level::Exact(template(p)?)),
        }
    }
    Ok(levels)
}

fn template(level: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = level;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("`{level}` has an unclosed `{{`"))?;
                let var = match &rest[1..end] {
                    "client_id" => Var::ClientId,
                    "username" => Var::Username,
                    "cert_cn" => Var::CertCn,
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}` (use {{client_id}}, {{username}} or {{cert_cn}})"
                        ));
                    }
                };
                parts.push(Part::Var(var));
                rest = &rest[end + 1..];
            }
            Some(at) => {
                parts.push(Part::Literal(rest[..at].to_owned()));
                rest = &rest[at..];
            }
            None => {
                if rest.contains('}') {
                    return Err(format!("`{level}` has a `}}` without `{{`"));
                }
                parts.push(Part::Literal(rest.to_owned()));
                rest = "";
            }
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &[(&str, Clients, Option<&str>)]) -> Rules {
        let configs: Vec<RuleConfig> = text
            .iter()
            .map(|(f, clients, username)| RuleConfig {
                clients: *clients,
                username: username.map(str::to_owned),
                publish: vec![(*f).to_owned()],
                subscribe: vec![(*f).to_owned()],
            })
            .collect();
        let mut problems = Problems::default();
        let rules = Rules::new(&configs, "auth", &mut problems);
        assert!(problems.is_empty(), "{:?}", problems.0);
        rules
    }

    fn device(client_id: &str, username: Option<&str>, cn: Option<&str>) -> Identity {
        Identity {
            kind: if cn.is_some() {
                Kind::Certificate
            } else if username.is_some() {
                Kind::Password
            } else {
                Kind::Anonymous
            },
            client_id: client_id.into(),
            username: username.map(str::to_owned),
            cert_cn: cn.map(str::to_owned),
        }
    }

    #[test]
    fn no_rules_allow_everything_and_any_rule_denies_by_default() {
        let d = device("pump7", None, None);
        assert!(Rules::default().may_publish(&d, "any/where"));
        let r = rules(&[("devices/{client_id}/#", Clients::Any, None)]);
        assert!(r.may_publish(&d, "devices/pump7/temp"));
        assert!(r.may_publish(&d, "devices/pump7"));
        assert!(!r.may_publish(&d, "devices/pump8/temp"));
        assert!(!r.may_publish(&d, "other"));
    }

    #[test]
    fn placeholders_are_literal_and_absent_values_match_nothing() {
        let r = rules(&[
            ("devices/{client_id}/#", Clients::Any, None),
            ("users/{username}/+", Clients::Password, None),
            ("cert/x-{cert_cn}", Clients::Certificate, None),
        ]);
        // A client id that looks like a wildcard is only itself.
        let sneaky = device("+", None, None);
        assert!(!sneaky.client_id.is_empty());
        assert!(!r.may_publish(&sneaky, "devices/pump7/temp"));
        assert!(r.may_publish(&sneaky, "devices/+/temp"));
        let anon = device("a", None, None);
        assert!(!r.may_publish(&anon, "users//x"));
        let user = device("a", Some("alice"), None);
        assert!(r.may_publish(&user, "users/alice/x"));
        assert!(!r.may_publish(&user, "users/alice/x/y"));
        let cert = device("a", None, Some("gw1"));
        assert!(r.may_publish(&cert, "cert/x-gw1"));
        assert!(!r.may_publish(&cert, "cert/x-gw12"));
        assert!(!r.may_publish(&user, "cert/x-"));
    }

    #[test]
    fn rules_for_one_user_and_dollar_topics() {
        let r = rules(&[("#", Clients::Password, Some("admin"))]);
        assert!(r.may_publish(&device("x", Some("admin"), None), "a/b"));
        assert!(!r.may_publish(&device("x", Some("bob"), None), "a/b"));
        assert!(!r.may_publish(&device("x", Some("admin"), None), "$SYS/x"));
    }

    #[test]
    fn bad_filters_are_reported() {
        let mut problems = Problems::default();
        let configs = vec![RuleConfig {
            clients: Clients::Any,
            username: None,
            publish: vec![
                "a/#/b".into(),
                "a/{nope}".into(),
                "x+".into(),
                "{client_id".into(),
            ],
            subscribe: vec!["b/#/c".into()],
        }];
        Rules::new(&configs, "auth", &mut problems);
        assert_eq!(problems.0.len(), 5, "{:?}", problems.0);
        assert_eq!(
            problems
                .0
                .iter()
                .filter(|p| p.path == "auth.rules[0].publish")
                .count(),
            4
        );
        assert!(
            problems
                .0
                .iter()
                .any(|p| p.path == "auth.rules[0].subscribe")
        );
    }

    #[test]
    fn subscribe_rights_cover_only_narrower_filters() {
        let r = rules(&[("devices/{client_id}/cmd/#", Clients::Any, None)]);
        let d = device("pump7", None, None);
        assert!(Rules::default().may_subscribe(&d, "#"));
        assert!(r.may_subscribe(&d, "devices/pump7/cmd/#"));
        assert!(r.may_subscribe(&d, "devices/pump7/cmd"));
        assert!(r.may_subscribe(&d, "devices/pump7/cmd/+/x"));
        assert!(
            !r.may_subscribe(&d, "devices/+/cmd/#"),
            "a wildcard over the client id"
        );
        assert!(!r.may_subscribe(&d, "devices/#"));
        assert!(!r.may_subscribe(&d, "devices/pump8/cmd/#"));
        let all = rules(&[
            ("plant/+/status", Clients::Any, None),
            ("#", Clients::Password, Some("app")),
        ]);
        assert!(all.may_subscribe(&d, "plant/+/status"));
        assert!(all.may_subscribe(&d, "plant/a/status"));
        assert!(!all.may_subscribe(&d, "plant/#"));
        let app = device("x", Some("app"), None);
        assert!(all.may_subscribe(&app, "#"));
        assert!(
            !all.may_subscribe(&app, "$SYS/#"),
            "leading wildcards exclude $ topics"
        );
    }

    #[test]
    fn a_rule_with_only_publish_grants_no_subscription() {
        let mut problems = Problems::default();
        let configs = vec![RuleConfig {
            clients: Clients::Any,
            username: None,
            publish: vec!["#".into()],
            subscribe: Vec::new(),
        }];
        let r = Rules::new(&configs, "auth", &mut problems);
        assert!(problems.is_empty());
        let d = device("d", None, None);
        assert!(r.may_publish(&d, "a"));
        assert!(!r.may_subscribe(&d, "a"));
    }
}
