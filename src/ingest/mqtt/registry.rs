//! The client ids the gateway knows: connected ones, so a second CONNECT with the same id
//! takes the first connection over (on either listener), and disconnected persistent
//! sessions, whose QoS 2 state a reconnecting client finds again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Disconnected persistent sessions remembered at most; beyond this the one closest to
/// expiry is forgotten (its client then hears "no session" and starts afresh).
const SAVED_SESSIONS: usize = 16_384;

/// QoS 2 packet ids stored and PUBREC'd, awaiting PUBREL. Shared by every connection of one
/// persistent session, so a client that reconnects (or takes over its own half-dead
/// connection) and resends an unreleased QoS 2 PUBLISH does not get it stored twice.
pub(super) type Released = Arc<Mutex<Qos2>>;

/// A session's QoS 2 state (see [`Released`]).
#[derive(Debug, Default)]
pub(super) struct Qos2 {
    /// Packet id → the log sequence number of its record.
    pub(super) ids: HashMap<u16, u64>,
    /// Set when a newer connection of the client starts a new session: this one's
    /// connections store without receipts from then on (`ingest::receipts`), so the new
    /// session's "forget" covers every receipt the old one wrote.
    pub(super) ended: bool,
}

/// Client ids the gateway knows: connected ones (for takeover) and disconnected persistent
/// sessions (for their QoS 2 state). In memory only: after a restart a resumed session's QoS
/// 2 state comes from the receipt store (`ingest::receipts`).
#[derive(Clone, Default)]
pub struct Registry {
    clients: Arc<Mutex<HashMap<String, Entry>>>,
    next_id: Arc<AtomicU64>,
}

struct Entry {
    /// The connection holding the client id, with the token that closes it on takeover.
    conn: Option<(u64, CancellationToken)>,
    awaiting_rel: Released,
    /// When a disconnected session is forgotten; `None` while connected, or never (3.1.1).
    expires: Option<Instant>,
    /// The connection that registered last, connected or not.
    last_conn: u64,
    /// Whether that connection's session outlives it. One that does not ends when a newer
    /// connection takes its client id over, so there is nothing to resume.
    keeps: bool,
}

/// What a CONNECT gets from the registry.
pub(super) struct Registered {
    pub(super) conn_id: u64,
    pub(super) taken_over: CancellationToken,
    pub(super) awaiting_rel: Released,
    pub(super) session_present: bool,
}

impl Registry {
    /// Registers `client_id`, telling the connection that held it (if any) to close. Without
    /// `clean_start` the previous session's QoS 2 state carries over, if that session was
    /// one to outlive its connection; `keeps` says whether the new one is. The connection's
    /// token is a child of `shutdown`: one waiter per connection for both ends, not two.
    pub(super) fn register(
        &self,
        client_id: &str,
        clean_start: bool,
        keeps: bool,
        shutdown: &CancellationToken,
    ) -> Registered {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = shutdown.child_token();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let previous = clients.remove(client_id);
        if let Some((_, old)) = previous.as_ref().and_then(|e| e.conn.as_ref()) {
            old.cancel();
        }
        let now = Instant::now();
        let (awaiting_rel, session_present) = match previous {
            Some(entry) if !clean_start && entry.keeps && entry.expires.is_none_or(|t| t > now) => {
                (entry.awaiting_rel, true)
            }
            Some(entry) => {
                entry
                    .awaiting_rel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ended = true;
                (Released::default(), false)
            }
            None => (Released::default(), false),
        };
        clients.insert(
            client_id.to_owned(),
            Entry {
                conn: Some((conn_id, taken_over.clone())),
                awaiting_rel: awaiting_rel.clone(),
                expires: None,
                last_conn: conn_id,
                keeps,
            },
        );
        Registered {
            conn_id,
            taken_over,
            awaiting_rel,
            session_present,
        }
    }

    /// Whether a connection newer than `conn_id` registered `client_id` (the client came
    /// back, or another took its id).
    pub(super) fn reconnected(&self, client_id: &str, conn_id: u64) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .get(client_id)
            .is_some_and(|e| e.last_conn != conn_id)
    }

    /// The connection ended. Unless a newer connection took the client id over, the
    /// session is forgotten, or kept for `keep` (`Some(None)`: until a clean start).
    pub(super) fn unregister(&self, client_id: &str, conn_id: u64, keep: Option<Option<Duration>>) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = clients.get_mut(client_id) else {
            return;
        };
        if entry.conn.as_ref().is_none_or(|(id, _)| *id != conn_id) {
            return;
        }
        match keep {
            Some(keep) => {
                entry.conn = None;
                entry.expires = keep.and_then(|d| Instant::now().checked_add(d));
                if clients.len() > SAVED_SESSIONS {
                    forget_one_saved(&mut clients);
                }
            }
            None => {
                clients.remove(client_id);
            }
        }
    }
}

/// Drops expired saved sessions, or failing that the one closest to expiry.
fn forget_one_saved(clients: &mut HashMap<String, Entry>) {
    let now = Instant::now();
    let before = clients.len();
    clients.retain(|_, e| e.conn.is_some() || e.expires.is_none_or(|t| t > now));
    if clients.len() < before {
        return;
    }
    let victim = clients
        .iter()
        .filter(|(_, e)| e.conn.is_none())
        .min_by_key(|(_, e)| (e.expires.is_none(), e.expires))
        .map(|(id, _)| id.clone());
    if let Some(id) = victim {
        clients.remove(&id);
    }
}
