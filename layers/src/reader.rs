//! Reading a device through its header, read-only: any byte range, with
//! `pread` from the layer files. Zero extents are filled in memory without
//! I/O. What the VMM's layered disk reads its base from.
//!
//! Not for the agent's bulk paths (materialize, the page server), which
//! batch reads through io_uring in its `store`.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header::{Header, Source};
use crate::id::HeaderId;

/// A header with its layer files open.
#[derive(Debug)]
pub struct Reader {
    header: Header,
    /// The open file of each layer of the header's list, same order.
    files: Vec<File>,
    /// Their paths, for errors.
    paths: Vec<PathBuf>,
}

impl Reader {
    /// Reads and checks the header file `path` (format version, checksum,
    /// mapping; and, when its name is a header id, that its bytes hash to
    /// that name), then opens its layers in `layers_dir`.
    pub fn open(path: &Path, layers_dir: &Path) -> Result<Reader> {
        let bytes = fs::read(path).map_err(Error::io("read the header", path))?;
        let name = format!("header file {}", path.display());
        let header = Header::decode(&name, &bytes)?;
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(HeaderId::parse);
        if let Some(named) = named.filter(|&id| id != HeaderId::of(&bytes)) {
            return Err(Error::HeaderCorrupt {
                name,
                reason: format!(
                    "its content hashes to {}, not to its name {named}",
                    HeaderId::of(&bytes)
                ),
            });
        }
        Reader::new(header, layers_dir)
    }

    /// Opens every layer of `header` in `layers_dir` (so a missing layer
    /// is found now, not at the first read of its blocks).
    pub fn new(header: Header, layers_dir: &Path) -> Result<Reader> {
        let mut files = Vec::with_capacity(header.layers().len());
        let mut paths = Vec::with_capacity(header.layers().len());
        for layer in header.layers() {
            let path = layers_dir.join(layer.id.to_string());
            let file = File::open(&path).map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::LayerMissing {
                    id: layer.id,
                    path: path.clone(),
                },
                _ => Error::io("open the layer", &path)(e),
            })?;
            files.push(file);
            paths.push(path);
        }
        Ok(Reader {
            header,
            files,
            paths,
        })
    }

    /// The header read through.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes of the device.
    pub fn size(&self) -> u64 {
        self.header.device_size()
    }

    /// Fills `out` with the device's bytes from `offset`. A range past the
    /// end of the device is [`Error::OutOfRange`].
    pub fn read_at(&self, out: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= size)
            .ok_or(Error::OutOfRange {
                offset,
                end: offset.saturating_add(out.len() as u64),
                size,
            })?;
        let bs = u64::from(self.header.block_size());
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let extent =
                self.header
                    .extent_of(block)
                    .ok_or(Error::OutOfRange { offset, end, size })?;
            let to = (extent.end() * bs).min(end);
            let dst = &mut out[(at - offset) as usize..(to - offset) as usize];
            match extent.source {
                Source::Zero => dst.fill(0),
                Source::Layer { layer, first_block } => {
                    let in_layer = (first_block + block - extent.start) * bs + at % bs;
                    self.read_layer(layer, dst, in_layer)?;
                }
            }
            at = to;
        }
        Ok(())
    }

    /// Reads `dst` from layer `index` of the header's list at `offset`.
    fn read_layer(&self, index: u32, dst: &mut [u8], offset: u64) -> Result<()> {
        let i = index as usize;
        let (file, path) = (&self.files[i], &self.paths[i]);
        file.read_exact_at(dst, offset).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::LayerShort {
                id: self.header.layer(index).id,
                path: path.clone(),
                block: offset / u64::from(self.header.block_size()),
            },
            _ => Error::io("read the layer", path)(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{Extent, LayerRef};
    use crate::id::LayerId;

    const BS: u64 = 4096;

    /// A 5-block device: blocks 0 and 4 zero, 1..3 from layer A blocks
    /// 2..4, 3 from layer B block 0; the device ends 100 bytes into block 4.
    fn fixture(dir: &Path) -> (Header, Vec<u8>) {
        let a: Vec<u8> = (0..4 * BS).map(|i| (i % 251) as u8 | 1).collect();
        let b: Vec<u8> = (0..BS).map(|i| (i % 13) as u8 + 100).collect();
        let (ida, idb) = (LayerId::of(&a), LayerId::of(&b));
        fs::write(dir.join(ida.to_string()), &a).unwrap();
        fs::write(dir.join(idb.to_string()), &b).unwrap();
        let size = 4 * BS + 100;
        let extents = vec![
            Extent {
                start: 0,
                len: 1,
                source: Source::Zero,
            },
            Extent {
                start: 1,
                len: 2,
                source: Source::Layer {
                    layer: 0,
                    first_block: 2,
                },
            },
            Extent {
                start: 3,
                len: 1,
                source: Source::Layer {
                    layer: 1,
                    first_block: 0,
                },
            },
            Extent {
                start: 4,
                len: 1,
                source: Source::Zero,
            },
        ];
        let layers = vec![
            LayerRef { id: ida, blocks: 4 },
            LayerRef { id: idb, blocks: 1 },
        ];
        let header = Header::from_parts(size, BS as u32, 1, None, layers, extents).unwrap();
        let mut device = vec![0u8; size as usize];
        device[BS as usize..3 * BS as usize].copy_from_slice(&a[2 * BS as usize..]);
        device[3 * BS as usize..4 * BS as usize].copy_from_slice(&b);
        (header, device)
    }

    #[test]
    fn every_range_reads_what_the_device_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (header, device) = fixture(dir.path());
        let path = dir.path().join("h");
        fs::write(&path, header.encode().unwrap()).unwrap();
        let reader = Reader::open(&path, dir.path()).unwrap();
        for (offset, len) in [
            (0, 4 * BS + 100),
            (1, 1),
            (BS - 7, 20),
            (2 * BS + 5, BS + 3),
        ] {
            let mut out = vec![0xeeu8; len as usize];
            reader.read_at(&mut out, offset).unwrap();
            assert_eq!(out, device[offset as usize..(offset + len) as usize]);
        }
        let mut out = [0u8; 2];
        let err = reader.read_at(&mut out, 4 * BS + 99).unwrap_err();
        assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn a_missing_layer_or_a_misnamed_header_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (header, _) = fixture(dir.path());
        let bytes = header.encode().unwrap();
        let wrong = dir.path().join(HeaderId([1; 32]).to_string());
        fs::write(&wrong, &bytes).unwrap();
        let err = Reader::open(&wrong, dir.path()).unwrap_err();
        assert!(err.to_string().contains("not to its name"), "{err}");

        fs::remove_file(dir.path().join(header.layers()[1].id.to_string())).unwrap();
        let right = dir.path().join(HeaderId::of(&bytes).to_string());
        fs::write(&right, &bytes).unwrap();
        let err = Reader::open(&right, dir.path()).unwrap_err();
        assert!(matches!(err, Error::LayerMissing { .. }), "{err}");
    }
}
