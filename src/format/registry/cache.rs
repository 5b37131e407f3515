//! The schemas learnt from the registry, kept on disk so a restarted gateway encodes while
//! the registry (or the whole uplink) is unreachable.
//!
//! One JSON file, [`FILE`] in the buffer directory's [`DIR`]: `{"version":1,"subjects":
//! {"<subject>":{"id":..,"version":..,"schema":"<schema text>"}}}`. It is replaced whole
//! (written beside, fsynced, renamed, the directory fsynced), so a crash leaves the old file
//! or the new one. A file that does not parse (damaged disk, a hand edit) is set aside as
//! `<file>.corrupt` and the gateway starts with an empty cache: it asks the registry again,
//! and records wait in the log meanwhile; it never stops the daemon.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The cache's directory, under the buffer directory.
pub const DIR: &str = "schema-registry";
/// The cache file in [`DIR`].
pub const FILE: &str = "schemas.json";

/// One subject's latest version as the registry gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u32,
    pub version: i32,
    pub schema: String,
    /// Absent in files written before JSON Schema was supported: Avro.
    #[serde(default, rename = "type", skip_serializing_if = "SchemaType::is_avro")]
    pub schema_type: SchemaType,
}

/// A schema's language, as the registry's `schemaType` names it (absent: Avro).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SchemaType {
    #[default]
    #[serde(rename = "AVRO")]
    Avro,
    #[serde(rename = "JSON")]
    Json,
    #[serde(rename = "PROTOBUF")]
    Protobuf,
}

impl SchemaType {
    pub fn is_avro(&self) -> bool {
        *self == SchemaType::Avro
    }

    /// The type the registry's `schemaType` names (absent: Avro); `None` for one the gateway
    /// does not encode.
    pub fn from_name(name: Option<&str>) -> Option<SchemaType> {
        match name {
            None | Some("AVRO") => Some(SchemaType::Avro),
            Some("JSON") => Some(SchemaType::Json),
            Some("PROTOBUF") => Some(SchemaType::Protobuf),
            Some(_) => None,
        }
    }

    /// The registry's name for it.
    pub fn name(self) -> &'static str {
        match self {
            SchemaType::Avro => "AVRO",
            SchemaType::Json => "JSON",
            SchemaType::Protobuf => "PROTOBUF",
        }
    }

    /// The route format that uses it.
    pub fn format(self) -> &'static str {
        match self {
            SchemaType::Avro => "avro",
            SchemaType::Json => "json_schema",
            SchemaType::Protobuf => "protobuf",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Document {
    version: u32,
    subjects: BTreeMap<String, Entry>,
}

/// The cache file under buffer directory `buffer_dir`.
pub fn path(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join(DIR).join(FILE)
}

/// What the file holds: empty when there is none. A damaged file is moved aside (and
/// said so in the error, for the log) rather than trusted.
pub fn load(path: &Path) -> (BTreeMap<String, Entry>, Option<String>) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (BTreeMap::new(), None),
        Err(e) => return (BTreeMap::new(), Some(format!("cannot read it: {e}"))),
    };
    match serde_json::from_slice::<Document>(&bytes) {
        Ok(doc) if doc.version == 1 => (doc.subjects, None),
        Ok(doc) => (
            BTreeMap::new(),
            Some(format!("unknown cache version {}", doc.version)),
        ),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let moved = std::fs::rename(path, &aside).is_ok();
            let why = if moved {
                format!("{e}; moved to {}", aside.display())
            } else {
                e.to_string()
            };
            (BTreeMap::new(), Some(why))
        }
    }
}

/// Replaces the file with `subjects`, atomically and durably.
pub fn store(path: &Path, subjects: &BTreeMap<String, Entry>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let doc = Document {
        version: 1,
        subjects: subjects.clone(),
    };
    let text = serde_json::to_vec(&doc).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32) -> Entry {
        Entry {
            schema_type: SchemaType::Avro,
            id,
            version: 2,
            schema: r#""string""#.into(),
        }
    }

    #[test]
    fn what_is_stored_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path());
        assert_eq!(load(&path), (BTreeMap::new(), None));
        let mut subjects = BTreeMap::new();
        subjects.insert("t-value".to_owned(), entry(4));
        store(&path, &subjects).unwrap();
        subjects.insert("u-value".to_owned(), entry(5));
        store(&path, &subjects).unwrap();
        assert_eq!(load(&path), (subjects.clone(), None));
        assert!(!path.with_extension("json.tmp").exists());
        // A JSON Schema says so; an Avro one is written as before, so older files load.
        subjects.insert(
            "j-value".to_owned(),
            Entry {
                schema_type: SchemaType::Json,
                ..entry(6)
            },
        );
        subjects.insert(
            "p-value".to_owned(),
            Entry {
                schema_type: SchemaType::Protobuf,
                ..entry(7)
            },
        );
        store(&path, &subjects).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(r#""type":"JSON""#).count(), 1, "{text}");
        assert_eq!(text.matches(r#""type":"PROTOBUF""#).count(), 1, "{text}");
        assert_eq!(load(&path), (subjects, None));
    }

    #[test]
    fn a_torn_or_corrupt_file_is_set_aside_and_the_cache_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path());
        let mut subjects = BTreeMap::new();
        subjects.insert("t-value".to_owned(), entry(4));
        store(&path, &subjects).unwrap();
        let whole = std::fs::read(&path).unwrap();
        for damaged in [
            whole[..whole.len() / 2].to_vec(),
            b"\0\0\0\0".to_vec(),
            br#"{"version":1,"subjects":{"t":{"id":-1}}}"#.to_vec(),
        ] {
            std::fs::write(&path, &damaged).unwrap();
            let (loaded, why) = load(&path);
            assert!(loaded.is_empty());
            assert!(why.unwrap().contains("moved to"));
            assert_eq!(
                std::fs::read(path.with_extension("json.corrupt")).unwrap(),
                damaged
            );
            assert!(!path.exists());
        }
        std::fs::write(&path, br#"{"version":7,"subjects":{}}"#).unwrap();
        assert!(load(&path).1.unwrap().contains("version 7"));
    }
}
