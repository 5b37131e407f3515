//! What SIGHUP changes while the gateway runs, and how each stage sees the value in force.
//!
//! A setting that can change without a restart implements [`Reloadable`]: it is built from
//! the loaded config (which has read and checked the files it names) and says which config
//! keys it comes from. [`Settings::publish`] puts the first value in a `tokio::sync::watch`
//! channel and hands back a [`Live`], the stage's view of it; a stage reads the value in
//! force where it needs it (per message, per connection, per request) and never holds the
//! borrow across an `.await`. A stage that gains a reloadable setting takes a `Live<T>` and
//! `start` publishes it: one line. (The shape is linkerd2-proxy's TLS credentials receiver: a
//! watch channel per setting, read per connection.)
//!
//! [`Settings::reload`] (SIGHUP) loads the config file again and applies it setting by
//! setting: a setting with a problem under its keys (a certificate whose key does not
//! match, an unreadable password file) keeps the value in force, with an ERROR line naming
//! each problem at its `file:line:col`, and the others change. A file that cannot be read or
//! parsed, or a problem anywhere else, changes nothing: "Not reloading: the config is
//! invalid.", with every problem.
//!
//! The settings today: the routes ([`crate::route::Router`]), `[auth]` ([`crate::auth::Auth`]:
//! rules, password file, the anonymous policy MQTT and CoAP apply) and the MQTT TLS
//! certificate, key and client CA (a rustls `ServerConfig`, see
//! [`crate::ingest::mqtt::tls`], which also rebuilds it when its files change on disk) and
//! `[schema_registry]` ([`crate::format::registry::client::Upstream`]).
//! Everything else needs a restart: listeners stay bound, the log and the Kafka client keep
//! the configuration they were opened with.

use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, Located};

/// A setting the gateway can replace while it runs.
pub trait Reloadable: Send + Sync + 'static {
    /// The config keys it is built from (`"routes"`, `"mqtt.tls"`): a problem under one of
    /// them keeps the value in force.
    const KEYS: &'static [&'static str];

    /// Why a config does not make a usable value.
    type Error: fmt::Display;

    /// Builds the setting from a loaded config.
    fn build(config: &Config) -> Result<Arc<Self>, Self::Error>;

    /// Logs that a reload put this value in force.
    fn reloaded(&self, config: &Config);

    /// Logs that a reload kept the value in force, and why.
    fn kept(why: &dyn fmt::Display);
}

/// A stage's view of one reloadable setting. Cheap to clone.
#[derive(Debug)]
pub struct Live<T>(watch::Receiver<Arc<T>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    /// A value that never changes: a stage started on its own, a test.
    pub fn fixed(value: T) -> Live<T> {
        Live(watch::channel(Arc::new(value)).1)
    }

    /// The value in force now. Keep the `Arc` for as long as one connection or request should
    /// see one value; a reload does not change it under the holder.
    pub fn current(&self) -> Arc<T> {
        self.0.borrow().clone()
    }

    /// Waits until a reload puts another value in force; never returns if the settings are
    /// gone (the gateway is stopping) or the value is fixed.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The value in force, borrowed: for a quick look on a hot path. Holds a read lock on the
    /// channel, so never across an `.await`.
    pub fn borrow(&self) -> watch::Ref<'_, Arc<T>> {
        self.0.borrow()
    }
}

impl<T> From<T> for Live<T> {
    fn from(value: T) -> Live<T> {
        Live::fixed(value)
    }
}

/// One published setting, as [`Settings`] rebuilds it.
trait Slot: Send + Sync {
    fn keys(&self) -> &'static [&'static str];
    fn reload(&self, config: &Config);
    fn keep(&self, why: &dyn fmt::Display);
    /// For [`Settings::replace`] to find the slot of one type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Reloadable> Slot for watch::Sender<Arc<T>> {
    fn keys(&self) -> &'static [&'static str] {
        T::KEYS
    }

    fn reload(&self, config: &Config) {
        match T::build(config) {
            Ok(value) => {
                value.reloaded(config);
                self.send_replace(value);
            }
            Err(why) => T::kept(&why),
        }
    }

    fn keep(&self, why: &dyn fmt::Display) {
        T::kept(why);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Every published setting: the sending side of their channels.
pub struct Settings {
    slots: Vec<Box<dyn Slot>>,
    /// The config the settings were last built from (the start's, then each reload's), for
    /// a watcher of the files it names.
    config: watch::Sender<Arc<Config>>,
}

impl Settings {
    /// No settings yet; `config` is the one the gateway starts with.
    pub fn new(config: &Config) -> Settings {
        Settings {
            slots: Vec::new(),
            config: watch::channel(Arc::new(config.clone())).0,
        }
    }

    /// Builds `T` from `config` and publishes it; the stage that uses it gets the view.
    pub fn publish<T: Reloadable>(&mut self, config: &Config) -> Result<Live<T>, T::Error> {
        let (sender, receiver) = watch::channel(T::build(config)?);
        self.slots.push(Box::new(sender));
        Ok(Live(receiver))
    }

    /// Loads the config file at `path` again and applies it setting by setting.
    pub fn reload(&self, path: &Path) {
        let checked = match Config::load_checked(path) {
            Ok(checked) => checked,
            Err(problems) => return not_reloading(path, &problems),
        };
        let owner = |problem: &Located| {
            let key = problem.key.as_deref()?;
            self.slots.iter().position(|slot| under(key, slot.keys()))
        };
        if checked.problems.iter().any(|p| owner(p).is_none()) {
            return not_reloading(path, &Listed(&checked.problems.iter().collect::<Vec<_>>()));
        }
        let config = Arc::new(checked.config);
        self.config.send_replace(config.clone());
        for (i, slot) in self.slots.iter().enumerate() {
            let mine: Vec<&Located> = checked
                .problems
                .iter()
                .filter(|p| owner(p) == Some(i))
                .collect();
            if mine.is_empty() {
                slot.reload(&config);
            } else {
                slot.keep(&Listed(&mine));
            }
        }
    }

    /// Puts a value of `T` built outside a reload in force (the TLS files changed on disk),
    /// with the same lines as a reload; on an error the value in force stays. Nothing when
    /// `T` was not published.
    pub fn replace<T: Reloadable>(&self, built: Result<Arc<T>, T::Error>) {
        let Some(sender) = self
            .slots
            .iter()
            .find_map(|slot| slot.as_any().downcast_ref::<watch::Sender<Arc<T>>>())
        else {
            return;
        };
        match built {
            Ok(value) => {
                value.reloaded(&self.config.borrow());
                sender.send_replace(value);
            }
            Err(why) => T::kept(&why),
        }
    }

    /// The latest config, as it changes.
    pub fn config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }
}

/// `key` is one of `keys` or inside one (`mqtt.tls.key` under `mqtt.tls`, `routes[2].topic`
/// under `routes`).
fn under(key: &str, keys: &[&str]) -> bool {
    keys.iter().any(|k| {
        key.strip_prefix(k)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

/// Problems as one field value: `file:line:col: message; ...`.
struct Listed<'a>(&'a [&'a Located]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

fn not_reloading(path: &Path, problems: &dyn fmt::Display) {
    tracing::error!(config = %path.display(), %problems, "Not reloading: the config is invalid.");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting built from `[gateway] id` (problems under `gateway.id`), refused when absent.
    #[derive(Debug, PartialEq)]
    struct Id(String);

    impl Reloadable for Id {
        const KEYS: &'static [&'static str] = &["gateway.id"];
        type Error = &'static str;

        fn build(config: &Config) -> Result<Arc<Id>, &'static str> {
            config
                .gateway
                .id
                .clone()
                .map(|id| Arc::new(Id(id)))
                .ok_or("no id")
        }

        fn reloaded(&self, _: &Config) {}

        fn kept(_: &dyn fmt::Display) {}
    }

    /// A config file holding `[gateway] id` (when given) and a route.
    fn write(dir: &Path, id: &str) -> std::path::PathBuf {
        let path = dir.join("gateway.toml");
        let text = format!("[gateway]\nid = \"{id}\"\n\n[default_route]\ntopic = \"t\"\n");
        std::fs::write(&path, text).expect("write");
        path
    }

    fn loaded(dir: &Path, id: &str) -> Config {
        Config::load(&write(dir, id)).expect("valid")
    }

    #[test]
    fn a_reload_publishes_what_builds_and_keeps_the_value_in_force_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings::new(&loaded(dir.path(), "a"));
        assert!(settings.publish::<Id>(&Config::default()).is_err());
        let live = settings
            .publish::<Id>(&loaded(dir.path(), "a"))
            .expect("built");
        let held = live.current();
        settings.reload(&write(dir.path(), "b"));
        assert_eq!(*live.current(), Id("b".into()));
        assert_eq!(*held, Id("a".into()), "a holder keeps the value it took");
        // A problem under the setting's keys: kept, but the config is the latest one.
        settings.reload(&write(dir.path(), "c:d"));
        assert_eq!(*live.current(), Id("b".into()));
        assert_eq!(
            settings.config().borrow().gateway.id.as_deref(),
            Some("c:d")
        );
        // A problem elsewhere: nothing changes.
        let path = write(dir.path(), "e");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("{text}[mqtt]\nlisten = \"nowhere\"\n")).expect("write");
        settings.reload(&path);
        assert_eq!(*live.borrow().as_ref(), Id("b".into()));
        assert_eq!(
            settings.config().borrow().gateway.id.as_deref(),
            Some("c:d")
        );
        // Built elsewhere.
        settings.replace(Ok(Arc::new(Id("f".into()))));
        assert_eq!(*live.current(), Id("f".into()));
        settings.replace::<Id>(Err("no"));
        assert_eq!(*live.current(), Id("f".into()));
    }

    #[test]
    fn keys_own_what_is_under_them() {
        assert!(under("mqtt.tls", &["mqtt.tls"]));
        assert!(under("mqtt.tls.key", &["mqtt.tls"]));
        assert!(under("routes[2].topic", &["routes", "default_route"]));
        assert!(!under("mqtt.tlsx", &["mqtt.tls"]));
        assert!(!under("mqtt.listen", &["mqtt.tls"]));
    }

    #[test]
    fn a_fixed_value_never_changes() {
        let live = Live::fixed(Id("x".into()));
        assert_eq!(*live.clone().current(), Id("x".into()));
    }
}
