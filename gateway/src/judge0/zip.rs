//! A small, strict reader for the zip archives of Judge0's `additional_files`: the central
//! directory is read from the end of the archive, each entry's data is found through its local
//! header, stored (method 0) and deflated (method 8) entries are taken, and each is checked
//! against its declared size and CRC-32. Anything else (encryption, zip64, other methods, sizes
//! past the caller's bound, a damaged archive) is refused with a reason. Directories are skipped.

const EOCD_SIGNATURE: u32 = 0x0605_4b50;
const CENTRAL_SIGNATURE: u32 = 0x0201_4b50;
const LOCAL_SIGNATURE: u32 = 0x0403_4b50;
const EOCD_LEN: usize = 22;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
/// The end record's comment is at most this long, so the record is within this of the end.
const MAX_COMMENT: usize = u16::MAX as usize;

/// One file of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub data: Vec<u8>,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

const CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE), as zip stores it.
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The files of `archive`, in the central directory's order, at most `max_files` of them and
/// `max_bytes` uncompressed in all.
pub fn read(archive: &[u8], max_files: usize, max_bytes: usize) -> Result<Vec<Entry>, String> {
    let damaged = |what: &str| format!("not a readable zip archive: {what}");
    let earliest = archive.len().saturating_sub(EOCD_LEN + MAX_COMMENT);
    let eocd = (earliest..=archive.len().saturating_sub(EOCD_LEN))
        .rev()
        .find(|&at| u32_at(archive, at) == Some(EOCD_SIGNATURE))
        .ok_or_else(|| damaged("no end of central directory record"))?;
    let count = usize::from(u16_at(archive, eocd + 10).ok_or_else(|| damaged("short record"))?);
    let offset = u32_at(archive, eocd + 16).ok_or_else(|| damaged("short record"))?;
    if offset == u32::MAX || count == usize::from(u16::MAX) {
        return Err("zip64 archives are not supported".to_string());
    }
    let mut at = offset as usize;
    let mut entries = Vec::new();
    let mut total = 0usize;
    for _ in 0..count {
        if u32_at(archive, at) != Some(CENTRAL_SIGNATURE) {
            return Err(damaged("a central directory entry is missing"));
        }
        let field = |off: usize| u16_at(archive, at + off).ok_or_else(|| damaged("short entry"));
        let word = |off: usize| u32_at(archive, at + off).ok_or_else(|| damaged("short entry"));
        let (flags, method) = (field(8)?, field(10)?);
        let (crc, compressed, size) = (word(16)?, word(20)?, word(24)?);
        let name_len = usize::from(field(28)?);
        let skip = usize::from(field(30)?) + usize::from(field(32)?);
        let local = word(42)? as usize;
        let name = archive
            .get(at + CENTRAL_LEN..at + CENTRAL_LEN + name_len)
            .ok_or_else(|| damaged("short entry name"))?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| "a file name in the archive is not UTF-8".to_string())?;
        at += CENTRAL_LEN + name_len + skip;
        if name.ends_with('/') {
            continue;
        }
        if flags & 1 != 0 {
            return Err(format!("{name:?} is encrypted"));
        }
        if [compressed, size].contains(&u32::MAX) {
            return Err("zip64 archives are not supported".to_string());
        }
        if entries.len() == max_files {
            return Err(format!("the archive has more than {max_files} files"));
        }
        total = total.saturating_add(size as usize);
        if total > max_bytes {
            return Err(format!(
                "the archive's files are larger than {max_bytes} bytes in all"
            ));
        }
        if u32_at(archive, local) != Some(LOCAL_SIGNATURE) {
            return Err(damaged("a local header is missing"));
        }
        let local_len = |off: usize| {
            u16_at(archive, local + off)
                .map(usize::from)
                .ok_or_else(|| damaged("short local header"))
        };
        let start = local + LOCAL_LEN + local_len(26)? + local_len(28)?;
        let stored = archive
            .get(start..start + compressed as usize)
            .ok_or_else(|| damaged("an entry's data is cut short"))?;
        let data = match method {
            0 => stored.to_vec(),
            8 => miniz_oxide::inflate::decompress_to_vec_with_limit(stored, size as usize)
                .map_err(|_| format!("{name:?} does not inflate to its declared size"))?,
            other => return Err(format!("{name:?} uses compression method {other}")),
        };
        if data.len() != size as usize || crc32(&data) != crc {
            return Err(format!("{name:?} does not match its size or CRC-32"));
        }
        entries.push(Entry { name, data });
    }
    Ok(entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A zip archive of `files`, each stored or deflated, the way any zip tool writes them.
    pub fn archive(files: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data, deflate) in files {
            let (method, body) = match deflate {
                true => (8u16, miniz_oxide::deflate::compress_to_vec(data, 6)),
                false => (0u16, data.to_vec()),
            };
            let local = out.len() as u32;
            let crc = crc32(data);
            let header = |sig: u32, central: bool| {
                let mut h = sig.to_le_bytes().to_vec();
                if central {
                    h.extend(20u16.to_le_bytes());
                }
                h.extend(20u16.to_le_bytes());
                h.extend(0u16.to_le_bytes());
                h.extend(method.to_le_bytes());
                h.extend([0u8; 4]);
                h.extend(crc.to_le_bytes());
                h.extend((body.len() as u32).to_le_bytes());
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((name.len() as u16).to_le_bytes());
                h.extend(0u16.to_le_bytes());
                if central {
                    h.extend([0u8; 10]);
                    h.extend(local.to_le_bytes());
                }
                h.extend(name.as_bytes());
                h
            };
            out.extend(header(LOCAL_SIGNATURE, false));
            out.extend(&body);
            central.extend(header(CENTRAL_SIGNATURE, true));
        }
        let offset = out.len() as u32;
        out.extend(&central);
        out.extend(EOCD_SIGNATURE.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn reads_stored_and_deflated_files_and_skips_directories() {
        let big = "line\n".repeat(1000);
        let zip = archive(&[
            ("data/", b"", false),
            ("data/in.txt", b"42\n", false),
            ("lib.py", big.as_bytes(), true),
        ]);
        let files = read(&zip, 64, 1 << 20).unwrap();
        assert_eq!(
            files,
            vec![
                Entry {
                    name: "data/in.txt".into(),
                    data: b"42\n".to_vec()
                },
                Entry {
                    name: "lib.py".into(),
                    data: big.into_bytes()
                },
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let zip = archive(&[("a.txt", b"hello", true), ("b.txt", b"world", false)]);
        assert!(read(&zip, 1, 1 << 20)
            .unwrap_err()
            .contains("more than 1 files"));
        assert!(read(&zip, 64, 6)
            .unwrap_err()
            .contains("larger than 6 bytes"));
        assert!(read(b"not a zip", 64, 100)
            .unwrap_err()
            .contains("not a readable"));
        let mut corrupt = zip.clone();
        let at = corrupt.windows(5).position(|w| w == b"world").unwrap();
        corrupt[at] = b'W';
        assert!(read(&corrupt, 64, 100).unwrap_err().contains("CRC-32"));
        assert!(read(&zip[..zip.len() - 30], 64, 100).is_err());
    }

    #[test]
    fn crc32_of_known_text() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
