//! The MQTT topic template of a `[[downlink]]`: literal text with `{key}`,
//! `{header:NAME}` and `{gateway_id}`.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Key,
    Header(String),
    GatewayId,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

/// What a record offers a template.
pub struct Values<'a> {
    pub key: Option<&'a [u8]>,
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
    pub gateway_id: &'a str,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.contains(['+', '#', '\0']) {
            return Err(format!("`{text}` has a wildcard: commands go to one topic"));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("`{text}` has an unclosed `{{`"))?;
                    let name = &rest[1..end];
                    parts.push(match name {
                        "key" => Part::Key,
                        "gateway_id" => Part::GatewayId,
                        h if h.starts_with("header:") && h.len() > 7 => {
                            Part::Header(h[7..].to_owned())
                        }
                        other => {
                            return Err(format!(
                                "unknown placeholder `{{{other}}}` (use {{key}}, {{header:NAME}} or {{gateway_id}})"
                            ));
                        }
                    });
                    rest = &rest[end + 1..];
                }
                Some(at) => {
                    parts.push(Part::Literal(rest[..at].to_owned()));
                    rest = &rest[at..];
                }
                None => {
                    if rest.contains('}') {
                        return Err(format!("`{text}` has a `}}` without `{{`"));
                    }
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        Ok(Template(parts))
    }

    /// The topic for one record, or why there is none: a placeholder without a value, or a
    /// value that would change the topic's levels or add a wildcard.
    pub fn render(&self, v: &Values<'_>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.0 {
            let (name, value): (&str, Option<&[u8]>) = match part {
                Part::Literal(s) => {
                    out.push_str(s);
                    continue;
                }
                Part::Key => ("key", v.key),
                Part::Header(h) => (h.as_str(), (v.header)(h)),
                Part::GatewayId => ("gateway_id", Some(v.gateway_id.as_bytes())),
            };
            let text = value
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| format!("no UTF-8 value for {{{name}}}"))?;
            if text.is_empty() || text.contains(['/', '+', '#', '\0']) {
                return Err(format!("{{{name}}} = `{text}` is not one topic level"));
            }
            out.push_str(text);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_one_level_per_placeholder() {
        let t = Template::parse("plant/{gateway_id}/{key}/commands/{header:kind}").expect("ok");
        let header = |name: &str| -> Option<&[u8]> { (name == "kind").then_some(&b"set"[..]) };
        let v = Values {
            key: Some(b"pump7"),
            header: &header,
            gateway_id: "gw1",
        };
        assert_eq!(t.render(&v).as_deref(), Ok("plant/gw1/pump7/commands/set"));
        let sneaky = Values {
            key: Some(b"a/b"),
            header: &header,
            gateway_id: "gw1",
        };
        assert!(t.render(&sneaky).is_err(), "a key cannot add a level");
        let wild = Values {
            key: Some(b"#"),
            header: &header,
            gateway_id: "gw1",
        };
        assert!(t.render(&wild).is_err(), "nor a wildcard");
        let none = Values {
            key: None,
            header: &header,
            gateway_id: "gw1",
        };
        assert!(t.render(&none).is_err());
        assert!(Template::parse("a/#").is_err());
        assert!(Template::parse("a/{nope}").is_err());
        assert!(Template::parse("a/{key").is_err());
    }
}
