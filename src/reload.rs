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
//! The settings today: the routes ([`crate::route::Router`]) and `[auth]`
//! ([`crate::auth::Auth`]: rules, password file, the anonymous policy MQTT and CoAP apply).
//! Everything else needs a restart: listeners stay bound, the log and the Kafka client keep
//! the configuration they were opened with.

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
}

impl<T: Reloadable> Slot for watch::Sender<Arc<T>> {
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
    /// The config file's directory, for relative paths on reload.
    base: PathBuf,
}

impl Settings {
    pub fn new(base: &Path) -> Settings {
        Settings {
            slots: Vec::new(),
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
    pub fn reload(&self, config: &Config) {
        for slot in &self.slots {
            slot.reload(config, &self.base);
        }
    }
}
