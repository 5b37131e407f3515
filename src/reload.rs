//! What SIGHUP changes while the gateway runs, and how each stage sees the value in force.
//!
//! A setting that can change without a restart implements [`Reloadable`]: it is built from
//! the config and checked whole. [`Settings::publish`] puts the first value in a
//! `tokio::sync::watch` channel and hands back a [`Live`], the stage's view of it; a stage
//! reads the value in force where it needs it (per message, per connection, per request) and
//! never holds the borrow across an `.await`. [`Settings::reload`] builds every published
//! setting again from a new config: a setting that fails its checks keeps the value in force,
//! with an ERROR line saying why, and the others change. A stage that gains a reloadable
//! setting takes a `Live<T>` and `start` publishes it: one line.
//!
//! The settings today: the routes ([`crate::route::Router`]), `[auth]` ([`crate::auth::Auth`]:
//! rules, password file, the anonymous policy MQTT and CoAP apply) and the MQTT TLS
//! certificate, key and client CA (a rustls `ServerConfig`, see
//! [`crate::ingest::mqtt::tls`], which also rebuilds it when its files change on disk).
//! Everything else needs a restart: listeners stay bound, the log and the Kafka client keep
//! the configuration they were opened with.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;

/// A setting the gateway can replace while it runs.
pub trait Reloadable: Send + Sync + Sized + 'static {
    /// Why a config does not make a usable value.
    type Error: std::fmt::Display;

    /// Builds the setting from `config` (relative paths against `base`), checking everything
    /// it can before it is used.
    fn build(config: &Config, base: &Path) -> Result<Self, Self::Error>;

    /// Logs that a reload put this value in force.
    fn reloaded(&self, config: &Config);

    /// Logs that a reload kept the value in force, and why.
    fn kept(why: &Self::Error);
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
    fn reload(&self, config: &Config, base: &Path);
    /// For [`Settings::rebuild`] to find the slot of one type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Reloadable> Slot for watch::Sender<Arc<T>> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn reload(&self, config: &Config, base: &Path) {
        match T::build(config, base) {
            Ok(value) => {
                value.reloaded(config);
                self.send_replace(Arc::new(value));
            }
            Err(why) => T::kept(&why),
        }
    }
}

/// Every published setting: the sending side of their channels.
pub struct Settings {
    slots: Vec<Box<dyn Slot>>,
    /// The config the settings were last built from (the start's, then each reload's), for
    /// a watcher of the files it names.
    config: watch::Sender<Arc<Config>>,
    /// The config file's directory, for relative paths on reload.
    base: PathBuf,
}

impl Settings {
    /// No settings yet; `config` is the one the gateway starts with.
    pub fn new(config: &Config, base: &Path) -> Settings {
        Settings {
            slots: Vec::new(),
            config: watch::channel(Arc::new(config.clone())).0,
            base: base.to_owned(),
        }
    }

    /// Builds `T` from `config` and publishes it; the stage that uses it gets the view.
    pub fn publish<T: Reloadable>(&mut self, config: &Config) -> Result<Live<T>, T::Error> {
        let (sender, receiver) = watch::channel(Arc::new(T::build(config, &self.base)?));
        self.slots.push(Box::new(sender));
        Ok(Live(receiver))
    }

    /// Builds every setting again from `config`; each one that fails keeps its value.
    pub fn reload(&self, config: Config) {
        let config = Arc::new(config);
        self.config.send_replace(config.clone());
        for slot in &self.slots {
            slot.reload(&config, &self.base);
        }
    }

    /// Builds `T` alone again from the latest config, because a file it reads changed: the
    /// same checks and lines as a reload. Nothing when `T` was not published.
    pub fn rebuild<T: Reloadable>(&self) {
        let config = self.config.borrow().clone();
        if let Some(slot) = self
            .slots
            .iter()
            .find(|slot| slot.as_any().is::<watch::Sender<Arc<T>>>())
        {
            slot.reload(&config, &self.base);
        }
    }

    /// The latest config, as it changes.
    pub fn config(&self) -> watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// The config file's directory.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting built from `[gateway] id`, refused when it is absent.
    #[derive(Debug, PartialEq)]
    struct Id(String);

    impl Reloadable for Id {
        type Error = &'static str;

        fn build(config: &Config, _: &Path) -> Result<Id, &'static str> {
            config.gateway.id.clone().map(Id).ok_or("no id")
        }

        fn reloaded(&self, _: &Config) {}

        fn kept(_: &&'static str) {}
    }

    fn with_id(id: Option<&str>) -> Config {
        let mut config = Config::default();
        config.gateway.id = id.map(str::to_owned);
        config
    }

    #[test]
    fn a_reload_publishes_what_builds_and_keeps_the_value_in_force_otherwise() {
        let mut settings = Settings::new(&with_id(Some("a")), Path::new("/"));
        assert!(settings.publish::<Id>(&with_id(None)).is_err());
        let live = settings.publish::<Id>(&with_id(Some("a"))).expect("built");
        let held = live.current();
        settings.reload(with_id(Some("b")));
        assert_eq!(*live.current(), Id("b".into()));
        assert_eq!(*held, Id("a".into()), "a holder keeps the value it took");
        settings.reload(with_id(None));
        assert_eq!(
            *live.current(),
            Id("b".into()),
            "kept: the new one does not build"
        );
        assert_eq!(settings.config().borrow().gateway.id, None);
        // A rebuild reads the latest config, which still does not build.
        settings.rebuild::<Id>();
        assert_eq!(*live.borrow().as_ref(), Id("b".into()));
    }

    #[test]
    fn a_fixed_value_never_changes() {
        let live = Live::fixed(Id("x".into()));
        assert_eq!(*live.clone().current(), Id("x".into()));
    }
}
