//! Templates a sandbox can start from. Today: base images, each a folder
//! `<images_dir>/<name>/` with `vmlinuz`, `initramfs.cpio.gz` and
//! `rootfs.ext4`, as `make image` builds them. Snapshot templates come with
//! pause and resume.

use std::path::{Path, PathBuf};

use lmdb_schema::TemplateName;

use super::error::SandboxError;

/// The files a VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

/// Base images found on this node.
#[derive(Debug, Clone)]
pub struct Templates {
    images_dir: PathBuf,
}

impl Templates {
    pub fn new(images_dir: impl Into<PathBuf>) -> Templates {
        Templates {
            images_dir: images_dir.into(),
        }
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    fn files_of(&self, name: &TemplateName) -> TemplateFiles {
        let dir = self.images_dir.join(name.as_str());
        TemplateFiles {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            rootfs: dir.join("rootfs.ext4"),
        }
    }

    /// The `manifest.json` the image build wrote for `name` (it may be
    /// missing: hand-made images have none).
    pub fn manifest_path(&self, name: &TemplateName) -> PathBuf {
        self.images_dir.join(name.as_str()).join("manifest.json")
    }

    /// The SHA-256 of `name`'s root file system, as its manifest.json says
    /// (`None` for a hand-made image without one).
    pub fn rootfs_sha256(&self, name: &TemplateName) -> Option<String> {
        let raw = std::fs::read(self.manifest_path(name)).ok()?;
        let manifest: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        manifest["files"]["rootfs.ext4"]["sha256"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// Whether every file of `name` is there.
    pub fn exists(&self, name: &TemplateName) -> bool {
        let files = self.files_of(name);
        [&files.kernel, &files.initramfs, &files.rootfs]
            .iter()
            .all(|f| f.is_file())
    }

    /// The files of `name`, which must exist.
    pub fn files(&self, name: &TemplateName) -> Result<TemplateFiles, SandboxError> {
        if self.exists(name) {
            Ok(self.files_of(name))
        } else {
            Err(SandboxError::TemplateNotFound(name.to_string()))
        }
    }

    /// Names of the complete base images, sorted.
    pub fn list(&self) -> Vec<TemplateName> {
        let Ok(entries) = std::fs::read_dir(&self.images_dir) else {
            return Vec::new();
        };
        let mut names: Vec<TemplateName> = entries
            .flatten()
            .filter_map(|e| TemplateName::parse(&e.file_name().to_string_lossy()).ok())
            .filter(|name| self.exists(name))
            .collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names
    }
}
