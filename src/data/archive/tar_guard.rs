//! A framing reader between a (decompressed) tar stream and `tar::Archive`.
//!
//! The tar crate reads GNU long-name/long-link and pax extension entries
//! whole into memory before its caller sees anything, whatever size their
//! header declares, and a gzip stream inflates without bound. This reader
//! parses every 512-byte header block before passing it on, refuses an
//! extension entry over [`MAX_EXTENSION_BYTES`] before its data is read, and
//! counts every byte of the stream against a limit.
//!
//! It frames entries as tar 0.4.46 does (a pax `size` record overrides the
//! size of the member it describes); GNU sparse members, whose extra header
//! blocks it does not frame, are refused.

use std::fmt;
use std::io::{self, Read};

const BLOCK: u64 = 512;

/// Largest GNU long name/link or pax extension entry: real ones hold one
/// path (at most 4 KiB on Linux) or a few records.
pub const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

/// Why the guard stopped the stream; [`Refusal::of`] finds it again in the
/// `io::Error` the tar crate passes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The stream runs past its limit.
    TooLong { limit: u64 },
    /// An extension entry declares more than [`MAX_EXTENSION_BYTES`].
    Extension { kind: &'static str, size: u64 },
    /// A GNU sparse member.
    Sparse,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooLong { limit } => write!(f, "the tar stream runs past {limit} bytes"),
            Refusal::Extension { kind, size } => write!(
                f,
                "a {kind} header declares {size} bytes; at most {MAX_EXTENSION_BYTES}"
            ),
            Refusal::Sparse => write!(f, "GNU sparse members are not supported"),
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    pub fn of(err: &io::Error) -> Option<&Refusal> {
        err.get_ref()?.downcast_ref()
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

pub struct TarGuard<R> {
    inner: Counted<R>,
    /// The header block being read, how much of it has been read, and how
    /// much of that passed on.
    block: [u8; BLOCK as usize],
    filled: usize,
    sent: usize,
    /// Bytes of the current entry's data and padding still to pass on.
    data_left: u64,
    /// The records of a pax header while they pass, and their length.
    pax: Option<(Vec<u8>, u64)>,
    /// What the last pax header says the next member's size is.
    pax_size: Option<u64>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner: Counted {
                inner,
                limit,
                read: 0,
            },
            block: [0; BLOCK as usize],
            filled: 0,
            sent: 0,
            data_left: 0,
            pax: None,
            pax_size: None,
        }
    }

    /// Reads the next header block whole and checks it; false at the end of
    /// the stream. A short last block is passed on for the tar crate to
    /// report.
    fn next_header(&mut self) -> io::Result<bool> {
        self.filled = 0;
        self.sent = 0;
        while self.filled < self.block.len() {
            match self.inner.read(&mut self.block[self.filled..])? {
                0 => break,
                n => self.filled += n,
            }
        }
        if self.filled == self.block.len() {
            self.check_header()?;
        }
        Ok(self.filled > 0)
    }

    fn check_header(&mut self) -> io::Result<()> {
        if self.block.iter().all(|&b| b == 0) {
            // The end-of-archive marker: the tar crate stops here.
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let extension = [
            (kind.is_gnu_longname(), "GNU long name"),
            (kind.is_gnu_longlink(), "GNU long link"),
            (kind.is_pax_local_extensions(), "pax"),
            (kind.is_pax_global_extensions(), "pax global"),
        ]
        .into_iter()
        .find_map(|(is, name)| is.then_some(name));
        let mut size = header.entry_size()?;
        if extension.is_none() {
            size = self.pax_size.unwrap_or(size);
        }
        if let Some(kind) = extension.filter(|_| size > MAX_EXTENSION_BYTES) {
            return Err(Refusal::Extension { kind, size }.into_io());
        }
        if kind.is_gnu_sparse() {
            return Err(Refusal::Sparse.into_io());
        }
        self.data_left = size.checked_next_multiple_of(BLOCK).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "tar entry size overflows")
        })?;
        // The tar crate consumes recognised long-name, long-link and pax
        // entries itself; the pax records reach up to the next other entry.
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let describes_next = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        if !describes_next {
            self.pax_size = None;
        }
        if recognized && kind.is_pax_local_extensions() {
            self.pax = Some((Vec::with_capacity(size as usize), size));
            self.keep_pax(&[]);
        }
        Ok(())
    }

    /// Keeps the pax records among `bytes`; once all have passed, reads
    /// their `size` as the tar crate does.
    fn keep_pax(&mut self, bytes: &[u8]) {
        let Some((records, len)) = &mut self.pax else {
            return;
        };
        let wanted = (*len - records.len() as u64).min(bytes.len() as u64) as usize;
        records.extend_from_slice(&bytes[..wanted]);
        if records.len() as u64 == *len {
            self.pax_size = pax_size(records);
            self.pax = None;
        }
    }
}

/// A stream that refuses to run past `limit` bytes.
struct Counted<R> {
    inner: R,
    limit: u64,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = loop {
            match self.inner.read(buf) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.read += n as u64;
        if self.read > self.limit {
            return Err(Refusal::TooLong { limit: self.limit }.into_io());
        }
        Ok(n)
    }
}

/// The first `size` record, unless a record before it is malformed.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() == Ok("size") {
            return record.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.sent == self.filled && self.data_left == 0 && !self.next_header()? {
            return Ok(0);
        }
        if self.sent < self.filled {
            let n = (self.filled - self.sent).min(buf.len());
            buf[..n].copy_from_slice(&self.block[self.sent..self.sent + n]);
            self.sent += n;
            return Ok(n);
        }
        let want = self.data_left.min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.data_left -= n as u64;
        self.keep_pax(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block of `kind` named `name` declaring `size`.
    fn header(kind: tar::EntryType, name: &str, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(kind);
        header.set_cksum();
        header
    }

    fn padded(bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out.resize(bytes.len().next_multiple_of(BLOCK as usize), 0);
        out
    }

    /// Each entry's path and contents, read through the guard.
    fn entries(stream: &[u8], limit: u64) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut archive = tar::Archive::new(TarGuard::new(stream, limit));
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            out.push((path, bytes));
        }
        Ok(out)
    }

    fn refusal(result: io::Result<Vec<(String, Vec<u8>)>>) -> Refusal {
        let err = result.expect_err("refused");
        Refusal::of(&err)
            .cloned()
            .unwrap_or_else(|| panic!("{err}"))
    }

    #[test]
    fn an_honest_archive_passes_unchanged() {
        let long = format!("{}/0.png", "deep-folder".repeat(30));
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in [("a/0.png", vec![1u8; 700]), (long.as_str(), vec![2; 3])] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            // Paths over 100 bytes go in a GNU long-name entry.
            builder
                .append_data(&mut header, path, bytes.as_slice())
                .unwrap();
        }
        let stream = builder.into_inner().unwrap();
        let mut passed = Vec::new();
        TarGuard::new(stream.as_slice(), u64::MAX)
            .read_to_end(&mut passed)
            .unwrap();
        assert_eq!(passed, stream);
        let read = entries(&stream, u64::MAX).unwrap();
        assert_eq!(read[0], ("a/0.png".to_string(), vec![1; 700]));
        assert_eq!(read[1], (long, vec![2; 3]));
    }

    #[test]
    fn an_archive_extension_header_over_the_cap_is_refused_before_its_data() {
        for (kind, name) in [
            (tar::EntryType::GNULongName, "GNU long name"),
            (tar::EntryType::GNULongLink, "GNU long link"),
            (tar::EntryType::XHeader, "pax"),
            (tar::EntryType::XGlobalHeader, "pax global"),
        ] {
            // Both encodings of the size field: octal, and GNU base-256.
            for declared in [2 << 30, 1 << 40] {
                let mut stream = header(kind, "././@LongLink", declared).as_bytes().to_vec();
                stream.extend(vec![b'a'; 4096]);
                assert_eq!(
                    refusal(entries(&stream, u64::MAX)),
                    Refusal::Extension {
                        kind: name,
                        size: declared
                    }
                );
            }
        }
    }

    #[test]
    fn an_archive_pax_size_frames_the_next_member_as_tar_does() {
        let records = b"13 size=1024\n";
        let mut stream = header(tar::EntryType::XHeader, "pax", records.len() as u64)
            .as_bytes()
            .to_vec();
        stream.extend(padded(records));
        // The ustar size says 0; the pax record says 1024, which tar follows.
        stream.extend(header(tar::EntryType::Regular, "big.png", 0).as_bytes());
        let mut data = vec![0u8; 512];
        data.extend(header(tar::EntryType::GNULongName, "hidden", 1 << 40).as_bytes());
        stream.extend(&data);
        stream.extend(header(tar::EntryType::Regular, "next.png", 1).as_bytes());
        stream.extend(padded(b"x"));
        stream.extend([0; 1024]);
        let read = entries(&stream, u64::MAX).unwrap();
        assert_eq!(read[0], ("big.png".to_string(), data));
        assert_eq!(read[1], ("next.png".to_string(), b"x".to_vec()));
    }

    #[test]
    fn an_archive_stream_past_its_limit_is_refused() {
        let mut stream = header(tar::EntryType::Regular, "zeros.png", 1 << 20)
            .as_bytes()
            .to_vec();
        stream.extend(vec![0; 1 << 20]);
        assert_eq!(
            refusal(entries(&stream, 64 * 1024)),
            Refusal::TooLong { limit: 64 * 1024 }
        );
        assert_eq!(entries(&stream, 2 << 20).unwrap()[0].1.len(), 1 << 20);
    }

    #[test]
    fn an_archive_sparse_member_is_refused() {
        let stream = header(tar::EntryType::GNUSparse, "holes.png", 0);
        assert_eq!(
            refusal(entries(stream.as_bytes(), u64::MAX)),
            Refusal::Sparse
        );
    }
}
