//! The cursor file: where the reader's head is, in two alternating checksummed slots, so a
//! write torn by a power cut leaves the previous slot intact.

use std::io;
use std::path::Path;

use super::io::{Storage, StorageFile, read_full_at};

pub(crate) const CURSOR_FILE: &str = "cursor";
const MAGIC: [u8; 8] = *b"EGLOGCUR";
const SLOT_LEN: usize = 44;
/// Slots sit in different disk sectors so one torn sector write cannot hit both.
const SLOT_OFFSETS: [u64; 2] = [0, 512];

/// The head: every record below `head_seq` was acknowledged. `seg_first`/`offset` say where
/// the record at the head starts, so the reader need not walk its segment to find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CursorPos {
    pub head_seq: u64,
    pub seg_first: u64,
    pub offset: u64,
}

pub(crate) struct CursorFile {
    file: Box<dyn StorageFile>,
    generation: u64,
}

/// What `load` found.
pub(crate) struct Loaded {
    pub cursor: CursorFile,
    pub pos: Option<CursorPos>,
    /// A slot held something that is not a valid cursor.
    pub damaged: bool,
    /// The file did not exist before.
    pub created: bool,
}

impl CursorFile {
    pub(crate) fn load(storage: &dyn Storage, dir: &Path) -> io::Result<Loaded> {
        let path = dir.join(CURSOR_FILE);
        let created = match storage.open(&path, false) {
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        let file = storage.open(&path, true)?;
        let mut best: Option<(u64, CursorPos)> = None;
        let mut damaged = false;
        for off in SLOT_OFFSETS {
            let mut buf = [0u8; SLOT_LEN];
            let n = read_full_at(file.as_ref(), &mut buf, off)?;
            if buf[..n].iter().all(|b| *b == 0) {
                continue;
            }
            match decode(&buf) {
                Some((generation, pos)) if best.is_none_or(|(g, _)| generation > g) => {
                    best = Some((generation, pos));
                }
                Some(_) => {}
                None => damaged = true,
            }
        }
        Ok(Loaded {
            cursor: CursorFile {
                file,
                generation: best.map_or(0, |(g, _)| g),
            },
            pos: best.map(|(_, p)| p),
            damaged,
            created,
        })
    }

    /// Writes the other slot and syncs it.
    pub(crate) fn store(&mut self, pos: CursorPos) -> io::Result<()> {
        let generation = self.generation + 1;
        let slot = SLOT_OFFSETS[(generation % 2) as usize];
        self.file.write_all_at(&encode(generation, pos), slot)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(())
    }
}

fn encode(generation: u64, pos: CursorPos) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&pos.head_seq.to_le_bytes());
    b[24..32].copy_from_slice(&pos.seg_first.to_le_bytes());
    b[32..40].copy_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..40]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8; SLOT_LEN]) -> Option<(u64, CursorPos)> {
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if b[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([b[40], b[41], b[42], b[43]]);
    if crc != crc32c::crc32c(&b[0..40]) {
        return None;
    }
    Some((
        u64_at(8),
        CursorPos {
            head_seq: u64_at(16),
            seg_first: u64_at(24),
            offset: u64_at(32),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::super::sim::MemFs;
    use super::*;

    #[test]
    fn alternates_and_survives_a_torn_slot() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        let mut l = CursorFile::load(&fs, dir).expect("load");
        assert!(l.created && l.pos.is_none() && !l.damaged);
        for h in 1..=3 {
            l.cursor
                .store(CursorPos {
                    head_seq: h,
                    seg_first: 0,
                    offset: 32,
                })
                .expect("store");
        }
        let l = CursorFile::load(&fs, dir).expect("load");
        assert_eq!(l.pos.map(|p| p.head_seq), Some(3));
        // Generation 3 sits in slot 1; damage it and the previous head comes back.
        fs.with_file(&dir.join(CURSOR_FILE), |d| d[512 + 20] ^= 0xff);
        let l = CursorFile::load(&fs, dir).expect("load");
        assert_eq!(l.pos.map(|p| p.head_seq), Some(2));
        assert!(l.damaged);
    }
}
