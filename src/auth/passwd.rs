//! The password file: one `username:hash` line per device, the hash an argon2id PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`). Blank lines and `#` comments are kept by
//! `edgegate passwd`. Plain-text passwords are refused when the file is read.
//!
//! Writes are atomic (a temporary file in the same directory, fsync'd, renamed over the old
//! one, the directory fsync'd) and the file is created 0600.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2};

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("cannot read the password file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the password file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Usernames and their hashes, read once (and again on SIGHUP).
pub struct Credentials {
    users: HashMap<String, String>,
    /// Verified against when the username is unknown, so an unknown user costs the same time
    /// as a wrong password and usernames cannot be probed by timing.
    dummy: String,
}

/// A username the file can hold: 1 to 256 characters, no `:`, whitespace or control characters.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Credentials, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "The password file is readable by others; chmod 600 it.");
            }
        }
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let invalid = |message: &str| PasswdError::Invalid {
                path: path.to_owned(),
                line: i + 1,
                message: message.to_owned(),
            };
            let Some((user, hash)) = line.split_once(':') else {
                return Err(invalid("expected `username:argon2id-hash`"));
            };
            if !valid_username(user) {
                return Err(invalid("invalid username"));
            }
            match PasswordHash::new(hash) {
                Ok(h) if h.algorithm.as_str() == "argon2id" => {}
                _ => {
                    return Err(invalid(
                        "not an argon2id hash (plain-text passwords are refused); write entries with `edgegate passwd`",
                    ));
                }
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(invalid("username listed twice"));
            }
        }
        Ok(Credentials {
            users,
            dummy: hash(b"edgegate-dummy-password")?,
        })
    }

    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Slow on purpose: call it off the async reactor.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        let known = self.users.get(username);
        let stored = known.unwrap_or(&self.dummy);
        let Ok(parsed) = PasswordHash::new(stored) else {
            return false;
        };
        Argon2::default().verify_password(password, &parsed).is_ok() && known.is_some()
    }
}

/// An argon2id hash with the crate's defaults (OWASP's m=19 MiB, t=2, p=1).
pub fn hash(password: &[u8]) -> Result<String, PasswdError> {
    let salt = SaltString::generate(&mut OsRng);
    let argon = Argon2::new(
        Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::default(),
    );
    argon
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswdError::Hash(e.to_string()))
}

/// Adds or replaces `username`'s entry in the file at `path` (created if absent), keeping
/// every other line as it was. Returns whether the user existed.
pub fn set(path: &Path, username: &str, password: &[u8]) -> Result<bool, PasswdError> {
    if !valid_username(username) {
        return Err(PasswdError::Input(format!(
            "`{username}` is not a valid username (1 to 256 characters, no `:`, spaces or control characters)"
        )));
    }
    if password.is_empty() {
        return Err(PasswdError::Input("the password is empty".into()));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PasswdError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let entry = format!("{username}:{}", hash(password)?);
    let mut found = false;
    let mut out = String::with_capacity(existing.len() + entry.len() + 1);
    for line in existing.lines() {
        let is_user = line
            .trim()
            .split_once(':')
            .is_some_and(|(u, _)| u == username && !line.trim_start().starts_with('#'));
        if is_user {
            if !found {
                out.push_str(&entry);
                out.push('\n');
            }
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&entry);
        out.push('\n');
    }
    write_atomically(path, out.as_bytes()).map_err(|source| PasswdError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(found)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_adds_updates_and_keeps_other_lines_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        std::fs::write(&path, "# devices\n").expect("write");
        assert!(!set(&path, "pump7", b"secret-1").expect("add"));
        assert!(!set(&path, "pump8", b"secret-2").expect("add"));
        assert!(set(&path, "pump7", b"secret-3").expect("update"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# devices\n"), "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("secret"), "{text}");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let creds = Credentials::load(&path).expect("load");
        assert!(creds.verify("pump7", b"secret-3"));
        assert!(!creds.verify("pump7", b"secret-1"));
        assert!(creds.verify("pump8", b"secret-2"));
        assert!(!creds.verify("nobody", b"edgegate-dummy-password"));
    }

    #[test]
    fn plain_text_and_bad_lines_are_refused_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        std::fs::write(&path, "\n# c\nalice:hunter2\n").expect("write");
        let e = Credentials::load(&path).err().expect("refused");
        assert!(e.to_string().contains(":3: not an argon2id hash"), "{e}");
        assert!(set(&path, "a:b", b"x").is_err());
        assert!(set(&path, "ok", b"").is_err());
    }
}
