use std::path::Path;

use super::*;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, Path::new("gw.toml")) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(found)) => found.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}

const ROUTE: &str = "[[routes]]\nmatch = \"#\"\ntopic = \"t\"\n";

#[test]
fn defaults_with_one_route_are_valid() {
    assert_eq!(problems(ROUTE), Vec::<String>::new());
    let config = Config::parse(ROUTE, Path::new("gw.toml")).expect("valid");
    assert_eq!(config.buffer.max_size, ByteSize::gib(1));
    assert_eq!(config.buffer.overflow, Overflow::RejectNew);
    assert_eq!(config.buffer.durability, Durability::Fsync);
}

#[test]
fn every_section_reports_its_own_error_with_line_and_column() {
    let text = "[buffer]\nmax_size = \"12 bananas\"\n\n[mqtt]\nlisten = \"x\"\nbogus = 1\n\n[wat]\n\n[[routes]]\nmatch = \"a/#/b\"\ntopic = \"t\"\n[[routes]]\ntopic = \"t\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:2:12: [buffer]"),
        "{}",
        found[0]
    );
    assert!(found[0].contains("unknown size unit"), "{}", found[0]);
    assert!(found[1].starts_with("gw.toml:6:1: [mqtt]"), "{}", found[1]);
    assert!(found[1].contains("bogus"), "{}", found[1]);
    assert!(
        found[2].starts_with("gw.toml:8:2: unknown section `wat`"),
        "{}",
        found[2]
    );
    assert!(
        found[3].starts_with("gw.toml:13:") && found[3].contains("match"),
        "{}",
        found[3]
    );
}

#[test]
fn validation_problems_point_at_their_keys() {
    let text = format!(
        "[buffer]\nhigh_watermark = 1.5\n\n[mqtt]\nlisten = \"nowhere\"\n\n{ROUTE}[[routes]]\nmatch = \"a/#/b\"\ntopic = \"t\"\n"
    );
    let found = problems(&text);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:2:18: buffer.high_watermark"),
        "{}",
        found[0]
    );
    assert!(
        found[1].starts_with("gw.toml:5:10: mqtt.listen"),
        "{}",
        found[1]
    );
    assert!(
        found[2].starts_with("gw.toml:11:9: routes[1].match"),
        "{}",
        found[2]
    );
}

#[test]
fn raw_property_problems_point_at_the_property() {
    let text = format!(
        "{ROUTE}\n[kafka.properties]\n\"socket.keepalive.enable\" = \"true\"\n\"acks\" = \"1\"\n"
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:7:10: kafka.properties.\"acks\""),
        "{}",
        found[0]
    );
    assert_eq!(
        path_parts("routes[2].topic"),
        [("routes", Some(2)), ("topic", None)]
    );
    assert_eq!(
        path_parts("kafka.properties.\"sasl.password\""),
        [
            ("kafka", None),
            ("properties", None),
            ("sasl.password", None)
        ]
    );
}

#[test]
fn syntax_errors_are_located() {
    let found = problems("[buffer\nmax_size = 3\n");
    assert!(!found.is_empty());
    assert!(found[0].starts_with("gw.toml:1:"), "{}", found[0]);
}

#[test]
fn no_route_at_all_is_a_problem() {
    let found = problems("");
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("no [[routes]]"), "{}", found[0]);
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncdé\nx", 0), (1, 1));
    assert_eq!(line_col("ab\ncdé\nx", 3), (2, 1));
    assert_eq!(line_col("ab\ncdé\nx", 8), (3, 1));
}

/// The shipped gateway.toml is the reference: it is valid, its values are the defaults, and
/// it shows every key of every section (set, or commented out when it has no default).
#[test]
fn shipped_gateway_toml_documents_every_key_with_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let text = std::fs::read_to_string(&path).expect("gateway.toml");
    let config = Config::parse(&text, &path).expect("the shipped gateway.toml is valid");
    let defaults = Config::default();
    assert_eq!(
        format!("{:?}", config.gateway),
        format!("{:?}", defaults.gateway)
    );
    assert_eq!(format!("{:?}", config.mqtt), format!("{:?}", defaults.mqtt));
    assert_eq!(format!("{:?}", config.coap), format!("{:?}", defaults.coap));
    assert_eq!(
        format!("{:?}", config.kafka),
        format!("{:?}", defaults.kafka)
    );
    assert_eq!(
        format!("{:?}", config.admin),
        format!("{:?}", defaults.admin)
    );
    assert_eq!(format!("{:?}", config.auth), format!("{:?}", defaults.auth));
    let buffer = BufferConfig {
        dir: defaults.buffer.dir.clone(),
        ..config.buffer.clone()
    };
    assert_eq!(format!("{buffer:?}"), format!("{:?}", defaults.buffer));
    let sections = [
        format!("{:?}", defaults.gateway),
        format!("{:?}", defaults.buffer),
        format!("{:?}", defaults.mqtt),
        format!("{:?}", defaults.coap),
        format!("{:?}", defaults.kafka),
        format!("{:?}", defaults.admin),
        format!("{:?}", defaults.auth),
        // Commented out in the shipped file: it has no default url.
        format!(
            "{:?}",
            crate::format::registry::config::RegistryConfig::default()
        ),
    ];
    for debug in sections {
        // `Name { field: value, other: value }`: every field name followed by ": ".
        for key in debug
            .split([',', '{'])
            .filter_map(|part| part.trim().split_once(": ").map(|(k, _)| k.trim()))
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        {
            let shown = text.lines().any(|line| {
                line.trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))
            });
            let table = ["kafka", "buffer", "mqtt"]
                .iter()
                .any(|section| text.contains(&format!("[{section}.{key}]")))
                || text.contains(&format!("[[auth.{key}]]"));
            assert!(shown || table, "gateway.toml does not show `{key}`");
        }
    }
}

/// Key files are checked at load, relative to the config file, and every problem points at
/// the key naming the file: missing key file, a key others may read, a malformed previous key.
#[test]
fn encryption_key_files_are_checked_where_they_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write("good.key", &"0f".repeat(32), 0o600);
    write("open.key", &"0f".repeat(32), 0o644);
    write("short.key", "0f0f", 0o600);
    let config = dir.path().join("gw.toml");
    let parse = |section: &str| {
        let text = format!("[buffer.encryption]\n{section}\n{ROUTE}");
        match Config::parse(&text, &config) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid(found)) => {
                Err(found.iter().map(ToString::to_string).collect::<Vec<_>>())
            }
            Err(e) => panic!("{e}"),
        }
    };
    let ok = parse("enabled = true\nkey_file = \"good.key\"").expect("a good key");
    let keys = ok.log_config().expect("keys load").keys.expect("keys");
    assert!(
        !format!("{keys:?}").contains("0f0f"),
        "keys are never printed"
    );

    let found = parse("enabled = true").expect_err("no key file");
    assert!(
        found[0].contains("gw.toml:1:1: buffer.encryption.key_file"),
        "{found:?}"
    );
    let found = parse(
        "enabled = true\nkey_file = \"open.key\"\nprevious_key_files = [\"good.key\", \"short.key\"]",
    )
    .expect_err("bad files");
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].contains(":3:12: buffer.encryption.key_file"),
        "{found:?}"
    );
    assert!(found[0].contains("chmod 600"), "{found:?}");
    assert!(
        found[1].contains(":4:35: buffer.encryption.previous_key_files[1]")
            && found[1].contains("64 hex digits"),
        "{found:?}"
    );
    // Disabled: the files are not read at all.
    parse("enabled = false\nkey_file = \"missing.key\"").expect("disabled");
}

#[test]
fn tls_and_auth_problems_point_at_their_keys() {
    let text = format!(
        "[mqtt.tls]\nenabled = true\nclient_certs = \"required\"\n\n[auth]\nmax_password_checks = 0\n\n[[auth.rules]]\npublish = [\"a/{{nope}}/#\"]\n\n{ROUTE}"
    );
    let found = problems(&text);
    assert_eq!(found.len(), 5, "{found:#?}");
    assert!(
        found
            .iter()
            .any(|p| p.contains("mqtt.tls.cert: is required")),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("mqtt.tls.key: is required")),
        "{found:#?}"
    );
    assert!(
        found.iter().any(|p| p.contains("mqtt.tls.client_ca")),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("gw.toml:6:23: auth.max_password_checks")),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("gw.toml:9:") && p.contains("unknown placeholder")),
        "{found:#?}"
    );
    let bad = problems("[auth]\nanonymous = \"sometimes\"\n");
    assert!(bad[0].starts_with("gw.toml:2:13: [auth]"), "{bad:#?}");
}

/// The MQTT TLS files and the password file are read at load, relative to the config file,
/// and each problem points at the key naming the file; a loaded config carries what they held.
#[test]
fn tls_and_password_files_are_checked_where_they_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    let server = |name: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = server("gateway");
    let (_, other_key) = server("other");
    write("server.crt", &cert);
    write("server.key", &key);
    write("other.key", &other_key);
    write("passwd", "");
    let config = dir.path().join("gw.toml");
    let parse = |tls: &str, auth: &str| {
        let text = format!("[mqtt.tls]\nenabled = true\n{tls}\n[auth]\n{auth}\n{ROUTE}");
        Config::parse(&text, &config)
    };

    let loaded = parse(
        "cert = \"server.crt\"\nkey = \"server.key\"",
        "password_file = \"passwd\"",
    )
    .expect("good files");
    assert!(loaded.files.mqtt_tls.is_some() && loaded.files.passwords.is_some());
    assert_eq!(loaded.mqtt.tls.cert, Some(dir.path().join("server.crt")));
    assert!(!format!("{loaded:?}").contains("PRIVATE KEY"));

    let found = match parse(
        "cert = \"server.crt\"\nkey = \"other.key\"",
        "password_file = \"missing\"",
    ) {
        Err(ConfigError::Invalid(found)) => found,
        other => panic!("{other:?}"),
    };
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 2, "{shown:#?}");
    assert!(
        shown[0].contains("gw.toml:4:7: mqtt.tls.key: the certificate and key are unusable")
            && shown[0].contains("other.key"),
        "{shown:#?}"
    );
    assert_eq!(found[0].key.as_deref(), Some("mqtt.tls.key"));
    assert!(
        shown[1].contains("gw.toml:6:17: auth.password_file: cannot read"),
        "{shown:#?}"
    );
    let found = match parse("cert = \"nothing.crt\"\nkey = \"server.key\"", "") {
        Err(ConfigError::Invalid(found)) => found,
        other => panic!("{other:?}"),
    };
    assert_eq!(found[0].key.as_deref(), Some("mqtt.tls.cert"), "{found:#?}");
}

/// `[schema_registry]`'s client certificate and password file (issue 15): read at load, each
/// problem at the key that names the file.
#[test]
fn registry_client_files_are_checked_where_they_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gw.toml");
    std::fs::write(dir.path().join("client.pem"), "not a certificate").expect("write");
    let text = format!(
        "{ROUTE}\n[schema_registry]\nurl = \"https://registry:8081\"\ncert_file = \"client.pem\"\nkey_file = \"missing.key\"\nusername = \"edge\"\npassword_file = \"missing\"\n"
    );
    let found = match Config::parse(&text, &config) {
        Err(ConfigError::Invalid(found)) => found,
        other => panic!("{other:?}"),
    };
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    let at = |key: &str| {
        shown
            .iter()
            .find(|s| s.contains(&format!(" {key}: ")))
            .unwrap_or_else(|| panic!("no problem at {key}: {shown:#?}"))
    };
    let lines = text.lines().count();
    assert!(at("schema_registry.cert_file").contains(&format!("gw.toml:{}:", lines - 3)));
    assert!(at("schema_registry.cert_file").contains("holds no certificate"));
    assert!(at("schema_registry.key_file").contains(&format!("gw.toml:{}:", lines - 2)));
    assert!(at("schema_registry.key_file").contains("cannot read"));
    assert!(at("schema_registry.password_file").contains(&format!("gw.toml:{lines}:")));
    assert!(at("schema_registry.password_file").contains("cannot read"));
    assert_eq!(found.len(), 3, "one problem per file: {shown:#?}");
}

/// Device timestamps (issue 15): every misused `timestamp*` key is reported at its place.
#[test]
fn device_timestamp_problems_point_at_their_keys() {
    let text = "[[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\ntimestamp_pointer = \"/ts\"\n\n\
                [[routes]]\nmatch = \"b/#\"\ntopic = \"t\"\ntimestamp = \"payload\"\n\n\
                [[routes]]\nmatch = \"c/#\"\ntopic = \"t\"\ntimestamp = \"payload\"\ntimestamp_pointer = \"ts\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:4:21: routes[0].timestamp_pointer"),
        "{}",
        found[0]
    );
    assert!(
        found[1].starts_with("gw.toml:9:13: routes[1].timestamp"),
        "{}",
        found[1]
    );
    assert!(
        found[2].starts_with("gw.toml:15:21: routes[2].timestamp_pointer"),
        "{}",
        found[2]
    );
    assert!(found[2].contains("RFC 6901"), "{}", found[2]);
    let unit = format!(
        "{ROUTE}timestamp = \"payload\"\ntimestamp_pointer = \"/ts\"\ntimestamp_unit = \"fortnights\"\n"
    );
    let found = problems(&unit);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:6:18: [routes]") && found[0].contains("fortnights"),
        "{}",
        found[0]
    );

    let good = "[[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\ntimestamp = \"payload\"\n\
                timestamp_pointer = \"/meta/ts\"\ntimestamp_unit = \"s\"\n\
                timestamp_max_future = \"5m\"\ntimestamp_max_age = \"30d\"\n";
    assert_eq!(problems(good), Vec::<String>::new());
    // Exactly once stamps the device time too (forward::transactional takes it the same way).
    let exactly_once = format!("[kafka]\ndelivery = \"exactly_once\"\n\n{good}");
    assert_eq!(problems(&exactly_once), Vec::<String>::new());
}

#[test]
fn schema_registry_problems_point_at_their_keys() {
    // An avro route without a registry, and a registry that is wrong in three ways.
    let text = "[[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\nformat = \"avro\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:4:10: routes[0].format")
            && found[0].contains("[schema_registry]"),
        "{}",
        found[0]
    );
    // So does a json_schema route, and the problem names that format.
    let text = "[[routes]]\nmatch = \"m/#\"\ntopic = \"t\"\nformat = \"json_schema\"\nsubject_strategy = \"record_name\"\nrecord_name = \"acme.Meter\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:4:10: routes[0].format")
            && found[0].contains("format = \"json_schema\" takes its schemas from a registry"),
        "{}",
        found[0]
    );
    // Sparkplug encoded to Avro needs the registry too; `encoding` is Sparkplug's alone.
    let text = "[[routes]]\nmatch = \"spBv1.0/#\"\ntopic = \"t\"\nformat = \"sparkplug_b\"\nencoding = \"avro\"\n\n\
                [[routes]]\nmatch = \"a/#\"\ntopic = \"u\"\nencoding = \"avro\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("gw.toml:5:12: routes[0].encoding")
                && p.contains("[schema_registry]")),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("gw.toml:10:12: routes[1].encoding")
                && p.contains("only routes with format = \"sparkplug_b\"")),
        "{found:#?}"
    );
    let text = "[schema_registry]\nurl = \"registry:8081\"\nusername = \"edge\"\nrefresh = \"10ms\"\n\n\
                [[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\nformat = \"avro\"\nsubject_strategy = \"record_name\"\n\n\
                [[routes]]\nmatch = \"b/#\"\ntopic = \"t\"\nrecord_name = \"acme.R\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 5, "{found:#?}");
    // In the order sections are validated: routes, then the registry.
    let starts = [
        "gw.toml:10:20: routes[0].subject_strategy",
        "gw.toml:15:15: routes[1].record_name",
        "gw.toml:2:7: schema_registry.url",
        "gw.toml:3:12: schema_registry.username",
        "gw.toml:4:11: schema_registry.refresh",
    ];
    for (found, start) in found.iter().zip(starts) {
        assert!(
            found.starts_with(start),
            "{found} does not start with {start}"
        );
    }
    let unknown = "[schema_registry]\nurl = \"http://r:8081\"\nschema_type = \"avro\"\n";
    let found = problems(&format!("{unknown}\n{ROUTE}"));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("gw.toml:3:1: [schema_registry]"),
        "{}",
        found[0]
    );

    let good = "[schema_registry]\nurl = \"https://registry.example:8081/api\"\n\
                username = \"edge\"\npassword = \"secret\"\nrefresh = \"5m\"\n\n\
                [[routes]]\nmatch = \"a/#\"\ntopic = \"t\"\nformat = \"avro\"\n\
                subject_strategy = \"topic_record_name\"\nrecord_name = \"acme.Reading\"\n";
    assert_eq!(problems(good), Vec::<String>::new());
    let config = Config::parse(good, Path::new("gw.toml")).expect("valid");
    let registry = config.schema_registry.expect("the section");
    assert_eq!(registry.refresh, Duration::from_secs(300));
    assert_eq!(registry.timeout, Duration::from_secs(10));
}
