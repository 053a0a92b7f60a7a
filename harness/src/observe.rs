//! Stage 5, observe: everything a trial saw, in a deterministic form.
//!
//! No timestamps (except old ones a scenario set on purpose), no raw inode
//! numbers (identity classes instead), no readdir order (sorted maps).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::layers::Stack;

/// The whole observation of one trial. This is what gets snapshotted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// `ok` or the errno of the (first) mount.
    pub mount: String,
    /// What the kernel wrote to the fs_context log (new mount API only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_log: Vec<String>,
    /// Effective super options from /proc/self/mountinfo, kernel order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub module_params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepObs>,
    /// The merged view after the last step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub merged: BTreeMap<String, NodeObs>,
    /// The upper layer as stored on disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upper: BTreeMap<String, NodeObs>,
    /// The work directory (index entries counted, not named).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub work: BTreeMap<String, String>,
    /// Set when a FUSE daemon died during the trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    /// Captured identity name -> class.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identities: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeObs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A file with fewer blocks than its size needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nlink: Option<u64>,
    /// Only times older than the trial: ones a scenario set on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// st_dev class: overlay, upper, lower0.. (merged view only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// Identity class of (st_dev, st_ino) (merged view only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ino: Option<String>,
    /// Whether the parent's readdir gave d_ino == st_ino (merged view only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_ino_matches: Option<bool>,
    /// The readdir d_type, shown only when it differs from the stat type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepObs {
    pub step: String,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<StatObs>,
    /// read data, readlink target or getxattr value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// listxattr names, sorted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<BTreeMap<String, EntryObs>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    /// syncfs/fsync: whether the upper layer's block device wrote sectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_writes: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatObs {
    #[serde(rename = "type")]
    pub kind: String,
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    pub dev: String,
    pub ino: String,
    /// Only when a step asks: an old time, or `recent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryObs {
    pub d_type: String,
    /// None where it is not meaningful (see Observer::d_ino_matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_ino_matches: Option<bool>,
}

/// Names equivalence classes of raw values in order of first sight, so the
/// same relationships always give the same labels.
#[derive(Debug, Default)]
pub struct Classes<K = (u64, u64)> {
    prefix: &'static str,
    seen: HashMap<K, String>,
}

impl<K: std::hash::Hash + Eq> Classes<K> {
    pub fn new(prefix: &'static str) -> Self {
        Classes {
            prefix,
            seen: HashMap::new(),
        }
    }

    pub fn class(&mut self, key: K) -> String {
        let n = self.seen.len() + 1;
        let prefix = self.prefix;
        self.seen
            .entry(key)
            .or_insert_with(|| format!("{prefix}{n}"))
            .clone()
    }
}

/// What a trial knows while it observes: devices and identity classes.
pub struct Observer {
    pub overlay_dev: u64,
    /// Devices that are neither the overlay's nor a layer's: overlay's
    /// per-layer pseudo devices, named in order of first sight.
    pub pseudo_devs: Classes,
    pub layer_devs: BTreeMap<String, u64>,
    pub identities: Classes<(String, u64)>,
    pub fsids: Classes<String>,
    pub started: i64,
    /// Directories' st_ino come from a per-mount counter.
    pub dir_ino_synthetic: bool,
    /// How many times the overlay was mounted again (mount cycles).
    pub mount_epoch: u64,
}

impl Observer {
    /// Whether d_ino equals st_ino, where that means something: a
    /// directory's st_ino from overlay's per-mount counter (layers on several
    /// filesystems, no xino) equals its d_ino only by chance.
    pub fn d_ino_matches(&self, st: &nix::sys::stat::FileStat, d_ino: u64) -> Option<bool> {
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && self.dir_ino_synthetic {
            return None;
        }
        Some(st.st_ino == d_ino)
    }

    /// Call after mounting with whether xino is on: for the kernel as its
    /// mountinfo shows, for a FUSE daemon as it was asked.
    pub fn note_xino(&mut self, xino: bool) {
        let mut devs: Vec<u64> = self.layer_devs.values().copied().collect();
        devs.sort();
        devs.dedup();
        self.dir_ino_synthetic = devs.len() > 1 && !xino;
    }

    pub fn new(stack: &Stack) -> Self {
        Observer {
            dir_ino_synthetic: false,
            mount_epoch: 0,
            overlay_dev: 0,
            pseudo_devs: Classes::new("pseudo"),
            layer_devs: stack.devs.clone(),
            identities: Classes::new("i"),
            fsids: Classes::new("fsid"),
            started: now() - 3600,
        }
    }

    /// `overlay`, the layer names sharing this device (`lower0+upper`), or `other`.
    pub fn dev_class(&mut self, dev: u64) -> String {
        if dev == self.overlay_dev {
            return "overlay".into();
        }
        let names: Vec<&str> = self
            .layer_devs
            .iter()
            .filter(|(_, d)| **d == dev)
            .map(|(n, _)| n.as_str())
            .collect();
        if names.is_empty() {
            // Per mount: a remount's anonymous devices may or may not reuse
            // numbers of the last mount's, which must not change the labels.
            self.pseudo_devs.class((dev, self.mount_epoch))
        } else {
            names.join("+")
        }
    }

    /// An object's identity: its device class and inode number. The class,
    /// not the raw st_dev, because overlay's anonymous devices change from
    /// mount to mount while what they stand for does not.
    pub fn identity(&mut self, st: &nix::sys::stat::FileStat) -> String {
        let dev = self.dev_class(st.st_dev);
        self.identities.class((dev, st.st_ino))
    }

    pub fn stat_obs(&mut self, st: &nix::sys::stat::FileStat) -> StatObs {
        let kind = kind_of_mode(st.st_mode);
        StatObs {
            kind: kind.into(),
            mode: format!("{:04o}", st.st_mode & 0o7777),
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            nlink: st.st_nlink,
            rdev: matches!(kind, "chardev" | "blockdev").then(|| rdev(st.st_rdev)),
            dev: self.dev_class(st.st_dev),
            ino: self.identity(st),
            atime: None,
        }
    }

    /// Walk the merged view: every object with its attributes and identity.
    pub fn merged(&mut self, root: &Path) -> io::Result<BTreeMap<String, NodeObs>> {
        let mut out = BTreeMap::new();
        let mut dirs = vec![String::new()];
        while let Some(rel) = dirs.pop() {
            let dir = if rel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(&rel)
            };
            for entry in read_dir_raw(&dir)? {
                if entry.name == "." || entry.name == ".." {
                    continue;
                }
                let child_rel = if rel.is_empty() {
                    entry.name.clone()
                } else {
                    format!("{rel}/{}", entry.name)
                };
                let path = root.join(&child_rel);
                // A name readdir lists but lookup refuses (e.g. a redirect
                // under redirect_dir=nofollow) is itself an observation.
                let st = match nix::sys::stat::lstat(&path) {
                    Ok(st) => st,
                    Err(e) => {
                        out.insert(
                            child_rel,
                            NodeObs {
                                kind: format!("error {}", crate::errno::name(e as i32)),
                                ..Default::default()
                            },
                        );
                        continue;
                    }
                };
                let mut node = self.node(&path, &st, false)?;
                node.dev = Some(self.dev_class(st.st_dev));
                node.ino = Some(self.identity(&st));
                node.d_ino_matches = self.d_ino_matches(&st, entry.ino);
                if entry.d_type != node.kind && entry.d_type != "unknown" {
                    node.d_type = Some(entry.d_type.clone());
                }
                if node.kind == "dir" {
                    dirs.push(child_rel.clone());
                }
                out.insert(child_rel, node);
            }
        }
        Ok(out)
    }

    /// Walk a layer directory on disk: whiteouts named as such, all xattrs.
    pub fn layer(&mut self, root: &Path) -> io::Result<BTreeMap<String, NodeObs>> {
        let mut out = BTreeMap::new();
        for rel in walk(root)? {
            let path = root.join(&rel);
            let st = nix::sys::stat::lstat(&path)?;
            let mut node = self.node(&path, &st, true)?;
            if node.kind == "whiteout" {
                // Whiteouts may share one inode; their nlink is no behaviour.
                node.nlink = None;
            }
            out.insert(rel, node);
        }
        Ok(out)
    }

    fn node(
        &self,
        path: &Path,
        st: &nix::sys::stat::FileStat,
        on_disk: bool,
    ) -> io::Result<NodeObs> {
        let mut kind = kind_of_mode(st.st_mode);
        if on_disk && kind == "chardev" && st.st_rdev == 0 {
            kind = "whiteout";
        }
        let mut node = NodeObs {
            kind: kind.into(),
            mode: (kind != "symlink" && kind != "whiteout")
                .then(|| format!("{:04o}", st.st_mode & 0o7777)),
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: (kind != "dir").then_some(st.st_nlink),
            mtime: (st.st_mtime < self.started).then_some(st.st_mtime),
            ..Default::default()
        };
        match kind {
            "file" => {
                node.size = Some(st.st_size as u64);
                node.sparse = Some(st.st_size > 0 && st.st_blocks * 512 < st.st_size);
                if st.st_size <= 4096 {
                    // A file may refuse to be read (EIO of a verity
                    // mismatch or lost metacopy data): that is observed too.
                    node.content = Some(match fs::read(path) {
                        Ok(bytes) => render_bytes(&bytes),
                        Err(e) => format!("<read error {}>", crate::errno::of_io(&e)),
                    });
                }
            }
            "symlink" => {
                node.target = Some(render_bytes(fs::read_link(path)?.as_os_str().as_bytes()))
            }
            "chardev" | "blockdev" => node.rdev = Some(rdev(st.st_rdev)),
            _ => {}
        }
        node.xattrs = xattrs(path)?;
        Ok(node)
    }

    /// The work dir: structure, with index entries counted (their names are
    /// file handles, which differ from run to run).
    pub fn work(&self, work: &Path) -> io::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut index_entries = 0usize;
        let mut temp_entries = 0usize;
        for rel in walk(work)? {
            if let Some(rest) = rel.strip_prefix("index/") {
                if !rest.contains('/') {
                    index_entries += 1;
                }
                continue;
            }
            // `work/#<hex>` temporaries (e.g. the shared whiteout) are named
            // after inode numbers.
            if rel
                .strip_prefix("work/")
                .is_some_and(|r| r.starts_with('#'))
            {
                temp_entries += 1;
                continue;
            }
            let st = nix::sys::stat::lstat(&work.join(&rel))?;
            out.insert(rel, kind_of_mode(st.st_mode).to_string());
        }
        if temp_entries > 0 {
            out.insert(
                "work/#*".into(),
                format!("{temp_entries} temporary entries"),
            );
        }
        if out.contains_key("index") {
            out.insert("index".into(), format!("dir ({index_entries} entries)"));
        }
        Ok(out)
    }
}

/// Relative paths of everything below `root`, sorted.
pub fn walk(root: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs = vec![String::new()];
    while let Some(rel) = dirs.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                dirs.push(child.clone());
            }
            out.push(child);
        }
    }
    out.sort();
    Ok(out)
}

pub struct RawEntry {
    pub name: String,
    pub d_type: String,
    pub ino: u64,
}

/// getdents64 on an open directory, from its current position.
pub fn read_fd_raw(fd: impl AsFd) -> io::Result<Vec<RawEntry>> {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    let mut iter = rustix::fs::RawDir::new(fd, &mut buf);
    let mut out = Vec::new();
    while let Some(e) = iter.next() {
        let e = e?;
        out.push(RawEntry {
            name: String::from_utf8_lossy(e.file_name().to_bytes()).into_owned(),
            d_type: kind_of_filetype(e.file_type()).into(),
            ino: e.ino(),
        });
    }
    Ok(out)
}

pub fn read_dir_raw(dir: &Path) -> io::Result<Vec<RawEntry>> {
    let f = fs::File::open(dir)?;
    read_fd_raw(&f)
}

pub fn kind_of_mode(mode: u32) -> &'static str {
    match mode & libc_s_ifmt() {
        0o100000 => "file",
        0o040000 => "dir",
        0o120000 => "symlink",
        0o010000 => "fifo",
        0o020000 => "chardev",
        0o060000 => "blockdev",
        0o140000 => "socket",
        _ => "unknown",
    }
}

const fn libc_s_ifmt() -> u32 {
    0o170000
}

fn kind_of_filetype(t: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType as T;
    match t {
        T::RegularFile => "file",
        T::Directory => "dir",
        T::Symlink => "symlink",
        T::Fifo => "fifo",
        T::CharacterDevice => "chardev",
        T::BlockDevice => "blockdev",
        T::Socket => "socket",
        _ => "unknown",
    }
}

pub fn kind_of_std(t: fs::FileType) -> &'static str {
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_char_device() {
        "chardev"
    } else if t.is_block_device() {
        "blockdev"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

pub fn rdev(dev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// Text as itself; binary values (file handles, digests) by their length.
pub fn render_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => s.to_string(),
        _ => format!("<binary {} bytes>", b.len()),
    }
}

/// All xattrs of a path (not following symlinks), values rendered.
pub fn xattrs(path: &Path) -> io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        // No xattr support at all (unionfs-fuse): nothing to list.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let n = name.to_string_lossy().into_owned();
        if let Some(v) = xattr::get(path, &name)? {
            out.insert(n, render_bytes(&v));
        }
    }
    Ok(out)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// unionfs-fuse keeps whiteouts as `.unionfs-fuse/<path>_HIDDEN~` files in
/// the writable branch: show them as whiteouts at their paths.
pub fn unionfs_upper(upper: BTreeMap<String, NodeObs>) -> BTreeMap<String, NodeObs> {
    const META: &str = ".unionfs-fuse";
    let mut out = BTreeMap::new();
    for (path, node) in upper {
        if path == META {
            continue;
        }
        match path.strip_prefix(".unionfs-fuse/") {
            Some(rest) => {
                if let Some(hidden) = rest.strip_suffix("_HIDDEN~") {
                    out.insert(
                        hidden.to_string(),
                        NodeObs {
                            kind: "whiteout".into(),
                            uid: node.uid,
                            gid: node.gid,
                            ..Default::default()
                        },
                    );
                }
                // Directories inside the meta tree only mirror the paths.
            }
            None => {
                out.insert(path, node);
            }
        }
    }
    out
}
