//! Schema registries for `tests/schema_registry.rs`.
//!
//! [`Registry`] is a fixture: the subset of Confluent's REST API that the gateway and the
//! decoder of the tests use (`GET /subjects/{subject}/versions/latest`, `GET
//! /schemas/ids/{id}`), on `127.0.0.1`, with schemas the test registers, and the faults a
//! test needs: [`Registry::stop`] closes the port (connection refused, as when the registry
//! is down), [`Registry::resume`] opens the same port again, with every schema kept. The
//! fault scenarios use it: the real registry below keeps its schemas in memory, so a stopped
//! and restarted one would come back empty, which is another fault than "down for a while".
//!
//! [`apicurio`] is a real one: Apicurio Registry, from its own distribution on Maven Central,
//! through its Confluent-compatible API (`/apis/ccompat/v7`), started by
//! `tools/registry/apicurio.sh` once per test binary that asks for it and stopped by the
//! script's watchdog when the binary exits. It checks what the fixture cannot: that the
//! gateway understands a real registry's answers, and that schemas registered there (Avro, a
//! new version, JSON Schema) encode records that independent decoders read back
//! (`tests/clients/registry_decode.py`: Python fastavro and jsonschema).
//! `EDGEGATE_TEST_REGISTRY=<ccompat url>` uses one started by hand;
//! `EDGEGATE_TEST_REGISTRY=skip` skips the tests that need it, saying so.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Schema texts; id `i + 1`.
    schemas: Vec<String>,
    /// Each subject's versions, oldest first: schema ids.
    subjects: HashMap<String, Vec<u32>>,
    /// Requests answered, for tests that check the gateway asked.
    requests: usize,
}

pub struct Registry {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    serving: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    secured: Option<Secured>,
}

/// What a secured registry asks of its clients: TLS with this server configuration (which
/// may require a client certificate), and the `Authorization` header, if set.
#[derive(Clone)]
pub struct Secured {
    pub tls: Arc<tokio_rustls::rustls::ServerConfig>,
    pub authorization: Option<String>,
}

impl Registry {
    /// Serving, on a port of its own.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// Serving over TLS only, and with basic authentication if `secured` says so: a client
    /// that fails the handshake or the header gets nothing, or 401.
    pub fn start_secured(secured: Secured) -> Registry {
        Registry::start_with(Some(secured))
    }

    fn start_with(secured: Option<Secured>) -> Registry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the registry");
        let addr = listener.local_addr().expect("its address");
        let mut registry = Registry {
            addr,
            state: Arc::default(),
            serving: None,
            secured,
        };
        registry.serve(listener);
        registry
    }

    /// Not serving: its port refuses connections until [`Registry::resume`].
    pub fn start_stopped() -> Registry {
        let mut registry = Registry::start();
        registry.stop();
        registry
    }

    pub fn url(&self) -> String {
        let scheme = if self.secured.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Closes the port.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.serving.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }

    /// Opens the same port again.
    pub fn resume(&mut self) {
        if self.serving.is_none() {
            let listener = TcpListener::bind(self.addr).expect("bind the registry's port again");
            self.serve(listener);
        }
    }

    /// Registers `schema` as the next version of `subject` (the same text again is the
    /// same id, as in Confluent's registry); its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let mut state = self.state.lock().expect("registry state");
        let id = match state.schemas.iter().position(|s| s == schema) {
            Some(i) => i as u32 + 1,
            None => {
                state.schemas.push(schema.to_owned());
                state.schemas.len() as u32
            }
        };
        state
            .subjects
            .entry(subject.to_owned())
            .or_default()
            .push(id);
        id
    }

    pub fn requests(&self) -> usize {
        self.state.lock().expect("registry state").requests
    }

    fn serve(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (state, stopping) = (self.state.clone(), stop.clone());
        let secured = self.secured.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        match &secured {
                            None => answer(stream, &state, None),
                            Some(secured) => {
                                let Ok(connection) = tokio_rustls::rustls::ServerConnection::new(
                                    secured.tls.clone(),
                                ) else {
                                    continue;
                                };
                                let mut tls =
                                    tokio_rustls::rustls::StreamOwned::new(connection, stream);
                                answer(&mut tls, &state, secured.authorization.as_deref());
                                tls.conn.send_close_notify();
                                let _ = tls.flush();
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        self.serving = Some((stop, thread));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(mut stream: impl Read + Write, state: &Mutex<State>, authorization: Option<&str>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let authorized = authorization.is_none_or(|expected| {
        text.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("authorization") && value.trim() == expected
            })
        })
    });
    let (status, body) = if !authorized {
        (
            "401 Unauthorized",
            serde_json::json!({"error_code": 401, "message": "Unauthorized"}),
        )
    } else {
        let mut state = state.lock().expect("registry state");
        state.requests += 1;
        route(&state, &path)
    };
    let body = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn route(state: &State, path: &str) -> (&'static str, serde_json::Value) {
    let not_found = |code: u32, message: &str| {
        (
            "404 Not Found",
            serde_json::json!({"error_code": code, "message": message}),
        )
    };
    let path = path.split('?').next().unwrap_or_default();
    if let Some(rest) = path.strip_prefix("/subjects/") {
        if let Some(subject) = rest.strip_suffix("/versions/latest") {
            let subject = decode(subject);
            return match state.subjects.get(&subject) {
                Some(ids) => {
                    let id = ids[ids.len() - 1];
                    (
                        "200 OK",
                        serde_json::json!({
                            "subject": subject,
                            "version": ids.len(),
                            "id": id,
                            "schema": state.schemas[id as usize - 1],
                        }),
                    )
                }
                None => not_found(40401, "Subject not found."),
            };
        }
    }
    if let Some(id) = path.strip_prefix("/schemas/ids/") {
        return match id
            .parse::<usize>()
            .ok()
            .and_then(|i| state.schemas.get(i.wrapping_sub(1)))
        {
            Some(schema) => ("200 OK", serde_json::json!({ "schema": schema })),
            None => not_found(40403, "Schema not found"),
        };
    }
    not_found(404, "HTTP 404 Not Found")
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The real registry of this test binary.
pub struct Apicurio {
    url: String,
}

static APICURIO: OnceLock<Option<Apicurio>> = OnceLock::new();

/// The real registry (started on first use); `None`, said on stderr, when
/// `EDGEGATE_TEST_REGISTRY=skip`.
pub fn apicurio(test: &str) -> Option<&'static Apicurio> {
    let registry = APICURIO.get_or_init(Apicurio::init).as_ref();
    if registry.is_none() {
        eprintln!(
            "{test}: SKIPPED: EDGEGATE_TEST_REGISTRY=skip (unset, the test starts Apicurio \
             Registry with tools/registry/apicurio.sh)"
        );
    }
    registry
}

impl Apicurio {
    fn init() -> Option<Apicurio> {
        match std::env::var("EDGEGATE_TEST_REGISTRY") {
            Ok(v) if v == "skip" => return None,
            Ok(url) => return Some(Apicurio { url }),
            Err(_) => {}
        }
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/registry/apicurio.sh");
        let run_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("apicurio-{}", std::process::id()));
        let output = std::process::Command::new(&script)
            .arg("start")
            .env("APICURIO_RUN_DIR", &run_dir)
            .env("APICURIO_WATCH_PID", std::process::id().to_string())
            .env("APICURIO_WATCH_CLEAN", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{} start failed ({}):\n{stderr}",
            script.display(),
            output.status
        );
        eprint!("{stderr}");
        let url = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Some(Apicurio { url })
    }

    /// The Confluent-compatible base URL, for `[schema_registry] url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers `schema` (of `schema_type`: `AVRO`, `JSON`, `PROTOBUF`) under `subject`; its id.
    pub fn register(&self, subject: &str, schema_type: &str, schema: &str) -> u32 {
        let body = serde_json::json!({"schemaType": schema_type, "schema": schema});
        let text = ureq::post(&format!("{}/subjects/{subject}/versions", self.url))
            .set("Content-Type", "application/vnd.schemaregistry.v1+json")
            .send_string(&body.to_string())
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_string().map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("registering a {schema_type} schema under {subject}: {e}"));
        let answer: serde_json::Value = serde_json::from_str(&text).expect("a JSON answer");
        u32::try_from(answer["id"].as_u64().expect("an id")).expect("a u32 id")
    }
}
