//! Stage 1, parse: a YAML scenario file becomes a checked [`Scenario`].
//!
//! The YAML shapes (`*Spec` types) mirror the file; [`load`] validates them and
//! reports every problem as `file:line:column: message`. Nothing is mounted or
//! written for a scenario that fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

use crate::errno;
use crate::matrix::Matrix;
use crate::spec::SpecIds;

/// A scenario that failed to load: always names file, line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for LoadError {}

// ---------------------------------------------------------------- YAML shapes

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSpec {
    pub description: String,
    #[schemars(with = "Vec<String>")]
    pub covers: Vec<Spanned<String>>,
    /// Which regression or prior-art check this scenario guards, free text.
    #[serde(default)]
    pub guards: Option<String>,
    /// Probed features the trial needs; unmet ones skip it with the reason.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub requires: Vec<Spanned<String>>,
    /// Restrict the option sets this scenario runs under (default: all).
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub option_sets: Option<Vec<Spanned<String>>>,
    /// Option sets this scenario does not apply to.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub skip_option_sets: Vec<Spanned<String>>,
    /// Filesystem for the layers: tmpfs (default), ext4, xfs or btrfs.
    #[serde(default)]
    pub fs: FsKind,
    pub layers: LayersSpec,
    #[serde(default)]
    pub mount: MountSpec,
    #[serde(default)]
    #[schemars(with = "Vec<StepSpec>")]
    pub steps: Vec<Spanned<StepSpec>>,
    /// Expected final state, as blocks that may each be conditional.
    #[serde(default)]
    #[schemars(with = "Vec<FinalSpec>")]
    pub expect: Vec<Spanned<FinalSpec>>,
    /// Seconds before the trial is killed and reported as hung.
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    #[default]
    Tmpfs,
    Ext4,
    Xfs,
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Tmpfs => "tmpfs",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayersSpec {
    /// Lower layers, topmost first.
    #[serde(default)]
    #[schemars(with = "Vec<BTreeMap<String, NodeSpec>>")]
    pub lower: Vec<TreeSpec>,
    /// The upper layer; absent means a read-only, lower-only mount.
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, NodeSpec>>")]
    pub upper: Option<TreeSpec>,
    /// Data-only lower layers (`lowerdir=a::d`).
    #[serde(default)]
    #[schemars(with = "Vec<BTreeMap<String, NodeSpec>>")]
    pub data: Vec<TreeSpec>,
    /// This many empty lower layers after `lower` (for the layer limit).
    #[serde(default)]
    pub empty_lower_layers: usize,
    /// An inner overlay, mounted before the scenario's own at `$NESTED`, to
    /// stack overlays (as a lower layer, or refused as an upper).
    #[serde(default)]
    pub nested: Option<NestedSpec>,
    /// Layers (`upper`, `lower0`, ...) whose directory is bind-mounted
    /// read-only before the overlay is mounted.
    #[serde(default)]
    pub read_only: Vec<String>,
}

/// The inner overlay of a nested stack: its own lowers and optional upper,
/// always mounted with mount(2) by the kernel.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NestedSpec {
    #[schemars(with = "Vec<BTreeMap<String, NodeSpec>>")]
    pub lower: Vec<TreeSpec>,
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, NodeSpec>>")]
    pub upper: Option<TreeSpec>,
}

impl LayersSpec {
    /// Every layer's tree: lowers, the upper, data-only layers, nested ones.
    pub fn trees(&self) -> impl Iterator<Item = &TreeSpec> {
        let nested = self
            .nested
            .iter()
            .flat_map(|n| n.lower.iter().chain(&n.upper));
        self.lower
            .iter()
            .chain(&self.upper)
            .chain(&self.data)
            .chain(nested)
    }
}

/// A tree: relative path -> node. Parents not listed are made as 0755 dirs.
pub type TreeSpec = BTreeMap<String, Spanned<NodeSpec>>;

/// One object, in a layer or in an expectation. Exactly one kind key in a
/// layer; in an expectation the kind may be left out to check only attributes.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// A regular file with this content.
    pub file: Option<String>,
    /// A regular file of this size (sparse: no data written).
    pub size: Option<u64>,
    /// Layers only: an executable built into the harness, for `exec`:
    /// `pause`, a 129-byte static x86-64 program that waits in pause(2).
    pub program: Option<ProgramKind>,
    /// Layers only, user-namespace option sets: owned by a host uid and gid
    /// that the namespace does not map (set from outside the namespace).
    #[serde(default)]
    pub owner_outside_userns: bool,
    /// Layers only: enable fs-verity on this regular file (`fs: ext4`).
    #[serde(default)]
    pub verity: bool,
    pub dir: Option<bool>,
    pub symlink: Option<String>,
    /// Another path of the same layer to hardlink to.
    pub hardlink: Option<String>,
    pub fifo: Option<bool>,
    pub chardev: Option<[u32; 2]>,
    pub blockdev: Option<[u32; 2]>,
    pub socket: Option<bool>,
    pub whiteout: Option<WhiteoutForm>,
    /// Expectation only: the path must not exist.
    pub absent: Option<bool>,
    pub opaque: Option<OpaqueMark>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Seconds since the epoch (layers: set; expectations: compared).
    pub mtime: Option<i64>,
    /// Expectation only.
    pub nlink: Option<u64>,
    /// Expectation only (merged view): readdir's d_ino equals st_ino.
    pub d_ino_matches: Option<bool>,
    /// Expectation only: the file has fewer blocks than its size needs.
    pub sparse: Option<bool>,
    /// Layers only: inode flags set with FS_IOC_SETFLAGS after everything
    /// else (`immutable`, `append`, `nodump`, `noatime`).
    #[serde(default)]
    pub attr_flags: Vec<String>,
    /// Name -> value. Names starting `overlay.` get the mount's xattr prefix
    /// (`trusted.` or `user.`). In expectations `~` means "must be absent" and
    /// `"<any>"` means "present with any value".
    #[serde(default)]
    pub xattrs: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProgramKind {
    /// Loops in pause(2) until killed.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WhiteoutForm {
    /// A character device 0/0.
    Chardev,
    /// A zero-size file with the `overlay.whiteout` xattr (6.7+).
    Xattr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
pub enum OpaqueMark {
    /// `overlay.opaque=y`: hides lower entries.
    #[serde(rename = "y")]
    Y,
    /// `overlay.opaque=x`: the directory holds xattr whiteouts (6.7+).
    #[serde(rename = "x")]
    X,
}

impl OpaqueMark {
    pub fn value(self) -> &'static str {
        match self {
            OpaqueMark::Y => "y",
            OpaqueMark::X => "x",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// Extra options appended after the option set's.
    #[serde(default)]
    pub options: Vec<String>,
    /// A complete option string instead of the generated one. `$LOWER0`,
    /// `$UPPER`, `$WORK`, `$DATA0`, `$ROOT` expand to the layer paths.
    #[serde(default)]
    pub raw: Option<String>,
    /// Expected mount(2) outcome: `ok` or an errno name.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub expect: Option<Spanned<String>>,
    #[serde(default)]
    pub expect_if: Vec<CondOutcomeSpec>,
    /// `mount` (mount(2), the default) or `fsopen` (fsopen, fsconfig,
    /// fsmount, move_mount).
    #[serde(default)]
    pub api: MountApi,
    /// fsopen only: the fsconfig calls in order, `key=value` or a bare flag
    /// `key`; `key=fd:PATH` passes PATH as an O_PATH fd (fsconfig_set_fd).
    /// Without it, each option of the option string is one call.
    #[serde(default)]
    pub params: Option<Vec<String>>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MountApi {
    #[default]
    Mount,
    Fsopen,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CondOutcomeSpec {
    pub when: WhenSpec,
    #[schemars(with = "String")]
    pub expect: Spanned<String>,
}

/// A condition on the trial: option set name, effective mount options (as
/// shown in mountinfo), probed features. All listed parts must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    #[serde(default)]
    pub sets: Vec<String>,
    #[serde(default)]
    pub not_sets: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub not_options: Vec<String>,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub not_features: Vec<String>,
    #[serde(default)]
    pub implementations: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    // One operation per step.
    pub open: Option<OpenArgs>,
    pub read: Option<ReadArgs>,
    pub write: Option<WriteArgs>,
    pub close: Option<String>,
    pub seek: Option<SeekArgs>,
    pub truncate: Option<TruncateArgs>,
    pub ftruncate: Option<FtruncateArgs>,
    pub mkdir: Option<MkdirArgs>,
    pub rmdir: Option<String>,
    pub unlink: Option<String>,
    pub rename: Option<RenameArgs>,
    pub link: Option<LinkArgs>,
    pub symlink: Option<SymlinkArgs>,
    pub readlink: Option<ReadlinkArgs>,
    pub mknod: Option<MknodArgs>,
    pub chmod: Option<ChmodArgs>,
    pub chown: Option<ChownArgs>,
    pub utimes: Option<UtimesArgs>,
    pub setxattr: Option<SetxattrArgs>,
    pub getxattr: Option<GetxattrArgs>,
    pub listxattr: Option<ListxattrArgs>,
    pub removexattr: Option<RemovexattrArgs>,
    pub stat: Option<StatArgs>,
    pub lstat: Option<StatArgs>,
    pub readdir: Option<ReaddirArgs>,
    pub statfs: Option<StatfsArgs>,
    pub mount_cycle: Option<bool>,
    pub drop_caches: Option<bool>,
    /// Unmount, change a layer on disk, mount again.
    pub offline: Option<OfflineArgs>,
    /// Change options of the live mount: mount(2) MS_REMOUNT or fspick +
    /// FSCONFIG_CMD_RECONFIGURE.
    pub remount: Option<RemountArgs>,
    /// flock(2) on a named fd, never blocking (EWOULDBLOCK when held).
    pub flock: Option<FlockArgs>,
    /// mmap(MAP_SHARED, PROT_READ) of a named fd, kept under a name.
    pub mmap: Option<MmapArgs>,
    /// Read a mapping's bytes (up to the first NUL or its length).
    pub read_map: Option<ReadMapArgs>,
    /// name_to_handle_at: encode a file handle and keep it under a name.
    pub handle: Option<HandleArgs>,
    /// open_by_handle_at with a kept handle (through the overlay's root).
    pub open_handle: Option<OpenHandleArgs>,
    /// FS_IOC_SETFLAGS: set and clear inode flags.
    pub chattr: Option<ChattrArgs>,
    /// FS_IOC_GETFLAGS: the inode flags, compared as a set.
    pub lsattr: Option<LsattrArgs>,
    /// syncfs(2) on the filesystem of a merged path.
    pub syncfs: Option<SyncArgs>,
    /// fsync(2) of a named fd.
    pub fsync: Option<SyncArgs>,
    /// Mount a second overlay with this option string at `$ROOT/extra`,
    /// then unmount it; the outcome is the mount's.
    pub extra_mount: Option<ExtraMountArgs>,
    /// Start a merged-view program and keep it running under a name.
    pub exec: Option<ExecArgs>,
    /// Kill a program started by `exec` and wait for it.
    pub kill: Option<String>,

    /// Run the operation as this user (a forked child with all ids set).
    #[serde(rename = "as")]
    pub as_user: Option<AsUser>,
    /// `ok` (default) or an errno name.
    #[schemars(with = "Option<String>")]
    pub expect: Option<Spanned<String>>,
    /// Conditional outcomes; the first whose `when` holds wins over `expect`.
    #[serde(default)]
    pub expect_if: Vec<CondOutcomeSpec>,
    /// Why this step is here, for the reader.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenArgs {
    pub path: String,
    /// Open the path in this layer's directory (`lower0`, `upper`, ...)
    /// instead of the merged view: a change behind the overlay's back.
    pub layer: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    pub mode: Option<u32>,
    /// Keep the fd under this name for later steps; without it the fd is closed.
    pub fd: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    pub fd: String,
    /// Bytes to read (default: up to 64 KiB).
    pub len: Option<usize>,
    /// Expected data.
    pub data: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    pub fd: String,
    pub data: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeekArgs {
    pub fd: String,
    pub offset: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TruncateArgs {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FtruncateArgs {
    pub fd: String,
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirArgs {
    pub path: String,
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameArgs {
    pub from: String,
    pub to: String,
    /// NOREPLACE, EXCHANGE, WHITEOUT (renameat2).
    #[serde(default)]
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkArgs {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SymlinkArgs {
    pub target: String,
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadlinkArgs {
    pub path: String,
    /// Expected target.
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MknodKind {
    Fifo,
    Chardev,
    Blockdev,
    Socket,
    File,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MknodArgs {
    pub path: String,
    pub kind: MknodKind,
    #[serde(default)]
    pub rdev: [u32; 2],
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChmodArgs {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChownArgs {
    pub path: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UtimesArgs {
    pub path: String,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
    /// Set both times to the current time (utimes(NULL)); this needs only
    /// write permission, where explicit times need ownership.
    #[serde(default)]
    pub now: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetxattrArgs {
    pub path: String,
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetxattrArgs {
    pub path: String,
    pub name: String,
    /// Expected value.
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListxattrArgs {
    pub path: String,
    /// Expected names, exactly (as a set).
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovexattrArgs {
    pub path: String,
    pub name: String,
}

/// stat/lstat/fstat with optional expected fields and identity capture.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatArgs {
    /// A path in the merged view, or
    pub path: Option<String>,
    /// with `layer`, a path in that layer's directory,
    /// a named fd (fstat).
    pub fd: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub nlink: Option<u64>,
    pub rdev: Option<[u32; 2]>,
    /// Expected st_dev class: overlay, upper, lower0.., data0.., other.
    pub dev: Option<String>,
    /// Expected st_atime (seconds); a recent time shows as `recent`.
    pub atime: Option<i64>,
    /// The layer of `path` (see `open`).
    pub layer: Option<String>,
    /// Remember (st_dev, st_ino) under this name.
    pub capture: Option<String>,
    /// Expect the same (st_dev, st_ino) as an earlier capture.
    pub same_as: Option<String>,
    /// Expect a different (st_dev, st_ino) from an earlier capture.
    pub differs_from: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReaddirArgs {
    pub path: Option<String>,
    /// Read from a named open directory fd instead (no reopen).
    pub fd: Option<String>,
    /// Seek the fd to 0 first.
    #[serde(default)]
    pub rewind: bool,
    /// Expected entries, name -> type (`.`/`..` are checked separately).
    pub entries: Option<BTreeMap<String, String>>,
    /// Expect d_ino == st_ino for every entry (`.`, `..` included).
    pub d_ino_matches: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatfsArgs {
    pub path: String,
    /// Remember f_fsid under this name.
    pub capture: Option<String>,
    pub same_as: Option<String>,
    pub differs_from: Option<String>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineArgs {
    /// `upper`, `lower0`.., `data0`..
    pub layer: String,
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, NodeSpec>")]
    pub add: TreeSpec,
    #[serde(default)]
    pub remove: Vec<String>,
    /// Replace the layer's directory by a new, empty one (a different
    /// inode) before `add`: "the same path, another layer".
    #[serde(default)]
    pub recreate: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlockArgs {
    pub fd: String,
    /// `exclusive`, `shared` or `unlock`.
    pub lock: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MmapArgs {
    pub fd: String,
    /// Name of the mapping for `read_map`.
    pub map: String,
    /// Bytes to map (default 4096).
    pub len: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadMapArgs {
    pub map: String,
    /// Expected bytes.
    pub data: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HandleArgs {
    pub path: String,
    /// Name to keep the handle under (it survives mount cycles).
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenHandleArgs {
    pub handle: String,
    /// Keep the opened fd under this name (e.g. to read it).
    pub fd: Option<String>,
    /// O_* flags (default O_RDONLY).
    #[serde(default)]
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChattrArgs {
    pub path: String,
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(default)]
    pub clear: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LsattrArgs {
    pub path: String,
    /// Expected flags (of those `attr_flags` knows), as a set.
    pub flags: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncArgs {
    /// syncfs: a merged path; fsync: a named fd.
    pub path: Option<String>,
    pub fd: Option<String>,
    /// Whether the upper layer's block device wrote anything during the
    /// call (loop-backed layers only: `fs: ext4|xfs|btrfs`).
    pub upper_writes: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Name for `kill`.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtraMountArgs {
    /// The option string; `$LOWER0`, `$UPPER`, ... expand as in `mount.raw`.
    pub raw: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemountArgs {
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub api: MountApi,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AsUser {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinalSpec {
    /// This block applies only when the condition holds.
    pub when: Option<WhenSpec>,
    pub merged: Option<TreeExpectSpec>,
    pub upper: Option<TreeExpectSpec>,
    /// Captured identities that must be equal / different, by name.
    #[serde(default)]
    pub same_identity: Vec<Vec<String>>,
    #[serde(default)]
    pub different_identity: Vec<Vec<String>>,
    /// Every object in the merged view reports the overlay's st_dev.
    pub dev_uniform: Option<bool>,
    /// d_ino == st_ino for every entry of every merged directory.
    pub d_ino_matches: Option<bool>,
    /// Options that must / must not appear in mountinfo.
    #[serde(default)]
    pub mount_options: Vec<String>,
    #[serde(default)]
    pub not_mount_options: Vec<String>,
    /// Pieces of text the fs_context log must contain (fsopen mounts).
    #[serde(default)]
    pub mount_log: Vec<String>,
    /// The work directory: path -> what the observation shows, e.g.
    /// `index: dir (1 entries)`.
    #[serde(default)]
    pub work: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TreeExpectSpec {
    /// No path other than those listed (and their parents) may exist.
    #[serde(default)]
    pub exact: bool,
    #[schemars(with = "BTreeMap<String, NodeSpec>")]
    pub tree: TreeSpec,
}

// ---------------------------------------------------------------- checked form

/// Where a value came from, for error messages after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl From<Location> for Pos {
    fn from(l: Location) -> Self {
        Pos {
            line: l.line(),
            column: l.column(),
        }
    }
}

/// A validated scenario: everything the later stages need.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub file: PathBuf,
    /// Directory under `cases/`: the spec chapter.
    pub area: String,
    /// File stem.
    pub name: String,
    pub spec: ScenarioSpec,
    pub steps: Vec<Step>,
    pub mount_expect: Outcome,
    pub mount_expect_if: Vec<(WhenSpec, Outcome)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok,
    Err(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Err(e) => f.write_str(e),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub pos: Pos,
    pub op: Op,
    pub as_user: Option<AsUser>,
    pub expect: Outcome,
    pub expect_if: Vec<(WhenSpec, Outcome)>,
}

#[derive(Debug, Clone)]
pub enum Op {
    Open(OpenArgs),
    Read(ReadArgs),
    Write(WriteArgs),
    Close(String),
    Seek(SeekArgs),
    Truncate(TruncateArgs),
    Ftruncate(FtruncateArgs),
    Mkdir(MkdirArgs),
    Rmdir(String),
    Unlink(String),
    Rename(RenameArgs),
    Link(LinkArgs),
    Symlink(SymlinkArgs),
    Readlink(ReadlinkArgs),
    Mknod(MknodArgs),
    Chmod(ChmodArgs),
    Chown(ChownArgs),
    Utimes(UtimesArgs),
    Setxattr(SetxattrArgs),
    Getxattr(GetxattrArgs),
    Listxattr(ListxattrArgs),
    Removexattr(RemovexattrArgs),
    Stat(StatArgs),
    Lstat(StatArgs),
    Readdir(ReaddirArgs),
    Statfs(StatfsArgs),
    MountCycle,
    DropCaches,
    Offline(OfflineArgs),
    Remount(RemountArgs),
    Flock(FlockArgs),
    Mmap(MmapArgs),
    ReadMap(ReadMapArgs),
    Handle(HandleArgs),
    OpenHandle(OpenHandleArgs),
    Chattr(ChattrArgs),
    Lsattr(LsattrArgs),
    Syncfs(SyncArgs),
    Fsync(SyncArgs),
    ExtraMount(ExtraMountArgs),
    Exec(ExecArgs),
    Kill(String),
}

impl Scenario {
    /// Whether a step mounts a second kernel overlay.
    pub fn uses_extra_mount(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.op, Op::ExtraMount(_)))
    }
}

impl Op {
    /// A short, deterministic label for reports and snapshots.
    pub fn label(&self) -> String {
        match self {
            Op::Open(a) => match &a.layer {
                Some(l) => format!("open {l}:{} [{}]", a.path, a.flags.join("|")),
                None => format!("open {} [{}]", a.path, a.flags.join("|")),
            },
            Op::Read(a) => format!("read {}", a.fd),
            Op::Write(a) => format!("write {} ({} bytes)", a.fd, a.data.len()),
            Op::Close(fd) => format!("close {fd}"),
            Op::Seek(a) => format!("seek {} {}", a.fd, a.offset),
            Op::Truncate(a) => format!("truncate {} {}", a.path, a.size),
            Op::Ftruncate(a) => format!("ftruncate {} {}", a.fd, a.size),
            Op::Mkdir(a) => format!("mkdir {}", a.path),
            Op::Rmdir(p) => format!("rmdir {p}"),
            Op::Unlink(p) => format!("unlink {p}"),
            Op::Rename(a) if a.flags.is_empty() => format!("rename {} -> {}", a.from, a.to),
            Op::Rename(a) => format!("rename {} -> {} [{}]", a.from, a.to, a.flags.join("|")),
            Op::Link(a) => format!("link {} -> {}", a.from, a.to),
            Op::Symlink(a) => format!("symlink {} -> {}", a.path, a.target),
            Op::Readlink(a) => format!("readlink {}", a.path),
            Op::Mknod(a) => format!("mknod {} {:?}", a.path, a.kind).to_lowercase(),
            Op::Chmod(a) => format!("chmod {} {:o}", a.path, a.mode),
            Op::Chown(a) => format!("chown {} {:?}:{:?}", a.path, a.uid, a.gid),
            Op::Utimes(a) => format!("utimes {}", a.path),
            Op::Setxattr(a) => format!("setxattr {} {}", a.path, a.name),
            Op::Getxattr(a) => format!("getxattr {} {}", a.path, a.name),
            Op::Listxattr(a) => format!("listxattr {}", a.path),
            Op::Removexattr(a) => format!("removexattr {} {}", a.path, a.name),
            Op::Stat(a) => format!("stat {}", stat_target(a)),
            Op::Lstat(a) => format!("lstat {}", stat_target(a)),
            Op::Readdir(a) => match (&a.path, &a.fd) {
                (_, Some(fd)) => {
                    format!("readdir fd {fd}{}", if a.rewind { " (rewind)" } else { "" })
                }
                (Some(p), None) => format!("readdir {p}"),
                (None, None) => "readdir".into(),
            },
            Op::Statfs(a) => format!("statfs {}", a.path),
            Op::MountCycle => "mount cycle".into(),
            Op::DropCaches => "drop caches".into(),
            Op::Offline(a) => format!("offline change to {}", a.layer),
            Op::Remount(a) => {
                format!("remount ({:?}) {}", a.api, a.options.join(",")).to_lowercase()
            }
            Op::Flock(a) => format!("flock {} {}", a.fd, a.lock),
            Op::Mmap(a) => format!("mmap {} as {}", a.fd, a.map),
            Op::ReadMap(a) => format!("read map {}", a.map),
            Op::Handle(a) => format!("name_to_handle_at {} as {}", a.path, a.name),
            Op::OpenHandle(a) => format!("open_by_handle_at {}", a.handle),
            Op::Chattr(a) => format!(
                "chattr {} +[{}] -[{}]",
                a.path,
                a.set.join(","),
                a.clear.join(",")
            ),
            Op::Lsattr(a) => format!("lsattr {}", a.path),
            Op::Syncfs(a) => format!("syncfs {}", a.path.as_deref().unwrap_or("")),
            Op::Fsync(a) => format!("fsync {}", a.fd.as_deref().unwrap_or("")),
            Op::ExtraMount(_) => "extra mount".into(),
            Op::Exec(a) => format!("exec {} as {}", a.path, a.name),
            Op::Kill(name) => format!("kill {name}"),
        }
    }
}

fn stat_target(a: &StatArgs) -> String {
    match (&a.path, &a.fd) {
        (Some(p), _) if a.layer.is_some() => {
            format!("{}:{p}", a.layer.as_deref().unwrap_or(""))
        }
        (Some(p), _) => p.clone(),
        (None, Some(fd)) => format!("fd {fd}"),
        _ => String::new(),
    }
}

/// Everything [`load`] checks names against.
pub struct Vocabulary<'a> {
    pub spec_ids: &'a SpecIds,
    pub matrix: &'a Matrix,
    pub features: &'a [&'a str],
}

/// Parse and validate one scenario file.
pub fn load(path: &Path, cases_root: &Path, vocab: &Vocabulary) -> Result<Scenario, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text, cases_root, vocab)
}

/// Read and deserialize a YAML file of the suite (matrix, implementations,
/// …); errors name file, line and column like a scenario's.
pub fn load_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    serde_saphyr::from_str(&text).map_err(|e| {
        let pos = e.location().map(Pos::from).unwrap_or_default();
        LoadError {
            file: path.to_path_buf(),
            line: pos.line,
            column: pos.column,
            message: yaml_message(&e),
        }
    })
}

/// Upper bounds that keep a hostile file from exhausting the machine.
const MAX_FILE_SIZE: u64 = 1 << 44; // 16 TiB, sparse
const MAX_TREE_NODES: usize = 200_000;
const MAX_LOWER_LAYERS: usize = 600;

pub fn parse(
    path: &Path,
    text: &str,
    cases_root: &Path,
    vocab: &Vocabulary,
) -> Result<Scenario, LoadError> {
    let err_at = |pos: Pos, message: String| LoadError {
        file: path.to_path_buf(),
        line: pos.line,
        column: pos.column,
        message,
    };
    let spec: ScenarioSpec = serde_saphyr::from_str(text).map_err(|e| {
        let pos = e.location().map(Pos::from).unwrap_or_default();
        err_at(pos, yaml_message(&e))
    })?;

    let rel = path.strip_prefix(cases_root).unwrap_or(path);
    let area = rel
        .parent()
        .and_then(|p| p.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_else(|| "misc".into());
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();

    let v = Validator {
        err_at: &err_at,
        vocab,
    };
    if spec.covers.is_empty() {
        return Err(err_at(
            Pos { line: 1, column: 1 },
            "`covers` lists no behaviour ID".into(),
        ));
    }
    for id in &spec.covers {
        if !vocab.spec_ids.contains(&id.value) {
            return Err(v.at(
                &id.referenced,
                format!("unknown behaviour ID `{}` (not in BEHAVIOURS.md)", id.value),
            ));
        }
    }
    for f in &spec.requires {
        v.feature(&f.value, &f.referenced)?;
    }
    for s in spec
        .option_sets
        .iter()
        .flatten()
        .chain(&spec.skip_option_sets)
    {
        if !vocab.matrix.sets.contains_key(&s.value) {
            return Err(v.at(
                &s.referenced,
                format!("unknown option set `{}` (see cases/matrix.yaml)", s.value),
            ));
        }
    }
    for l in &spec.layers.read_only {
        if !layer_names(&spec.layers).contains(l) {
            return Err(err_at(
                Pos { line: 1, column: 1 },
                format!("`read_only` names `{l}`, which is not a layer of this scenario"),
            ));
        }
    }
    if spec.layers.lower.len() + spec.layers.empty_lower_layers > MAX_LOWER_LAYERS {
        return Err(err_at(
            Pos { line: 1, column: 1 },
            format!("more than {MAX_LOWER_LAYERS} lower layers"),
        ));
    }
    let mut nodes = 0usize;
    for tree in spec
        .layers
        .lower
        .iter()
        .chain(&spec.layers.upper)
        .chain(&spec.layers.data)
    {
        nodes += tree.len();
        v.layer_tree(tree)?;
    }
    if nodes > MAX_TREE_NODES {
        return Err(err_at(
            Pos { line: 1, column: 1 },
            format!("layers hold {nodes} nodes, more than {MAX_TREE_NODES}"),
        ));
    }

    let mount_expect = match &spec.mount.expect {
        Some(e) => v.outcome(e)?,
        None => Outcome::Ok,
    };
    let mount_expect_if = spec
        .mount
        .expect_if
        .iter()
        .map(|c| {
            Ok((
                v.when(&c.when, &c.expect.referenced)?,
                v.outcome(&c.expect)?,
            ))
        })
        .collect::<Result<Vec<_>, LoadError>>()?;

    let mut steps = Vec::new();
    for s in &spec.steps {
        steps.push(v.step(s, &spec.layers)?);
    }
    for block in &spec.expect {
        let at = &block.referenced;
        if let Some(w) = &block.value.when {
            v.when(w, at)?;
        }
        for t in block.value.merged.iter().chain(&block.value.upper) {
            v.expect_tree(&t.tree)?;
        }
    }

    Ok(Scenario {
        file: path.to_path_buf(),
        area,
        name,
        spec,
        steps,
        mount_expect,
        mount_expect_if,
    })
}

/// serde-saphyr's message without its "line X column Y" prefix and snippet.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.without_snippet().to_string();
    let first = full.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let msg = match first.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => first,
    };
    // The position is already in front; drop serde-saphyr's repeat of it.
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

struct Validator<'a, F: Fn(Pos, String) -> LoadError> {
    err_at: &'a F,
    vocab: &'a Vocabulary<'a>,
}

impl<F: Fn(Pos, String) -> LoadError> Validator<'_, F> {
    fn at(&self, loc: &Location, msg: String) -> LoadError {
        (self.err_at)(Pos::from(*loc), msg)
    }

    fn feature(&self, name: &str, at: &Location) -> Result<(), LoadError> {
        if self.vocab.features.contains(&name) {
            Ok(())
        } else {
            Err(self.at(
                at,
                format!(
                    "unknown feature `{name}`; known: {}",
                    self.vocab.features.join(", ")
                ),
            ))
        }
    }

    fn outcome(&self, s: &Spanned<String>) -> Result<Outcome, LoadError> {
        let v = s.value.trim();
        if v.eq_ignore_ascii_case("ok") {
            return Ok(Outcome::Ok);
        }
        if errno::from_name(v).is_some() {
            Ok(Outcome::Err(v.to_string()))
        } else {
            Err(self.at(
                &s.referenced,
                format!("unknown errno name `{v}` (expected `ok` or a name like EXDEV)"),
            ))
        }
    }

    fn when(&self, w: &WhenSpec, at: &Location) -> Result<WhenSpec, LoadError> {
        for s in w.sets.iter().chain(&w.not_sets) {
            if !self.vocab.matrix.sets.contains_key(s) {
                return Err(self.at(at, format!("unknown option set `{s}` in `when`")));
            }
        }
        for f in w.features.iter().chain(&w.not_features) {
            self.feature(f, at)?;
        }
        Ok(w.clone())
    }

    /// A layer tree: relative clean paths, one kind per node, no path through
    /// a symlink of the same layer, hardlinks to existing non-directories.
    fn layer_tree(&self, tree: &TreeSpec) -> Result<(), LoadError> {
        for (path, node) in tree {
            let at = &node.referenced;
            check_rel_path(path).map_err(|m| self.at(at, format!("path `{path}`: {m}")))?;
            if path.ends_with('/') {
                return Err(self.at(
                    at,
                    format!("path `{path}`: no trailing `/` in a layer tree"),
                ));
            }
            let n = &node.value;
            let kinds = node_kinds(n);
            if kinds.len() != 1 {
                return Err(self.at(at, format!(
                    "`{path}` must have exactly one of file, size, dir, symlink, hardlink, fifo, chardev, blockdev, socket, whiteout (has {})",
                    if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") }
                )));
            }
            if n.absent.is_some() || n.nlink.is_some() {
                return Err(self.at(
                    at,
                    format!("`{path}`: `absent` and `nlink` are for expectations, not layers"),
                ));
            }
            if n.opaque.is_some() && n.dir != Some(true) {
                return Err(self.at(at, format!("`{path}`: only a directory can be opaque")));
            }
            if let Some(f) = n
                .attr_flags
                .iter()
                .find(|f| crate::steps::attr_flag(f).is_none())
            {
                return Err(self.at(
                    at,
                    format!(
                        "`{path}`: unknown inode flag `{f}` (immutable, append, nodump, noatime)"
                    ),
                ));
            }
            if n.verity && n.file.is_none() && n.size.is_none() && n.program.is_none() {
                return Err(self.at(at, format!("`{path}`: only a regular file can have verity")));
            }
            if n.size.is_some_and(|s| s > MAX_FILE_SIZE) {
                return Err(self.at(at, format!("`{path}`: size larger than {MAX_FILE_SIZE}")));
            }
            if n.xattrs.values().any(|v| v.is_none()) {
                return Err(self.at(at, format!("`{path}`: a layer xattr needs a value")));
            }
            // Every proper prefix must be a directory of this tree, if listed.
            let mut prefix = String::new();
            for comp in path.split('/').take(path.split('/').count() - 1) {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
                if let Some(p) = tree.get(&prefix) {
                    if p.value.symlink.is_some() {
                        return Err(self.at(at, format!("path `{path}` goes through the symlink `{prefix}` of the same layer")));
                    }
                    if p.value.dir != Some(true) {
                        return Err(self.at(
                            at,
                            format!("path `{path}` is below `{prefix}`, which is not a directory"),
                        ));
                    }
                }
            }
            if let Some(target) = &n.hardlink {
                check_rel_path(target)
                    .map_err(|m| self.at(at, format!("hardlink target `{target}`: {m}")))?;
                match tree.get(target) {
                    None => return Err(self.at(at, format!("`{path}`: hardlink target `{target}` is not in this layer"))),
                    Some(t) if t.value.hardlink.is_some() => {
                        return Err(self.at(at, format!("`{path}`: hardlink target `{target}` is itself a hardlink; link to the original")))
                    }
                    Some(t) if t.value.dir.is_some() => {
                        return Err(self.at(at, format!("`{path}`: cannot hardlink to the directory `{target}`")))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    fn expect_tree(&self, tree: &TreeSpec) -> Result<(), LoadError> {
        for (path, node) in tree {
            check_rel_path(path)
                .map_err(|m| self.at(&node.referenced, format!("path `{path}`: {m}")))?;
            let kinds = node_kinds(&node.value);
            if kinds.len() > 1 {
                return Err(self.at(
                    &node.referenced,
                    format!("`{path}` expects several kinds: {}", kinds.join(", ")),
                ));
            }
            if node.value.hardlink.is_some() {
                return Err(self.at(
                    &node.referenced,
                    format!("`{path}`: use `same_identity` to expect a hardlink"),
                ));
            }
        }
        Ok(())
    }

    fn step(&self, s: &Spanned<StepSpec>, layers: &LayersSpec) -> Result<Step, LoadError> {
        let at = &s.referenced;
        let st = &s.value;
        let mut ops: Vec<Op> = Vec::new();
        macro_rules! take {
            ($field:ident, $variant:expr) => {
                if let Some(a) = &st.$field {
                    ops.push($variant(a.clone()));
                }
            };
        }
        take!(open, Op::Open);
        take!(read, Op::Read);
        take!(write, Op::Write);
        take!(close, Op::Close);
        take!(seek, Op::Seek);
        take!(truncate, Op::Truncate);
        take!(ftruncate, Op::Ftruncate);
        take!(mkdir, Op::Mkdir);
        take!(rmdir, Op::Rmdir);
        take!(unlink, Op::Unlink);
        take!(rename, Op::Rename);
        take!(link, Op::Link);
        take!(symlink, Op::Symlink);
        take!(readlink, Op::Readlink);
        take!(mknod, Op::Mknod);
        take!(chmod, Op::Chmod);
        take!(chown, Op::Chown);
        take!(utimes, Op::Utimes);
        take!(setxattr, Op::Setxattr);
        take!(getxattr, Op::Getxattr);
        take!(listxattr, Op::Listxattr);
        take!(removexattr, Op::Removexattr);
        take!(stat, Op::Stat);
        take!(lstat, Op::Lstat);
        take!(readdir, Op::Readdir);
        take!(statfs, Op::Statfs);
        take!(offline, Op::Offline);
        take!(remount, Op::Remount);
        take!(flock, Op::Flock);
        take!(mmap, Op::Mmap);
        take!(read_map, Op::ReadMap);
        take!(handle, Op::Handle);
        take!(open_handle, Op::OpenHandle);
        take!(chattr, Op::Chattr);
        take!(lsattr, Op::Lsattr);
        take!(syncfs, Op::Syncfs);
        take!(fsync, Op::Fsync);
        take!(extra_mount, Op::ExtraMount);
        take!(exec, Op::Exec);
        take!(kill, Op::Kill);
        if st.mount_cycle == Some(true) {
            ops.push(Op::MountCycle);
        }
        if st.drop_caches == Some(true) {
            ops.push(Op::DropCaches);
        }
        if ops.len() != 1 {
            return Err(self.at(
                at,
                format!(
                    "a step needs exactly one operation, found {}",
                    if ops.is_empty() {
                        "none".to_string()
                    } else {
                        ops.iter().map(|o| o.label()).collect::<Vec<_>>().join(", ")
                    }
                ),
            ));
        }
        let op = ops.pop().expect("one op");
        for p in op_paths(&op) {
            check_step_path(p).map_err(|m| self.at(at, format!("path `{p}`: {m}")))?;
        }
        let known_layer = |l: &str| -> Result<(), LoadError> {
            let known = layer_names(layers);
            if known.contains(l) {
                return Ok(());
            }
            Err(self.at(
                at,
                format!(
                    "unknown layer `{l}`; this scenario has {}",
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        };
        match &op {
            Op::Open(a) => {
                for f in &a.flags {
                    if crate::steps::open_flag(f).is_none() {
                        return Err(self.at(at, format!("unknown open flag `{f}`")));
                    }
                }
                if let Some(l) = &a.layer {
                    known_layer(l)?;
                }
            }
            Op::OpenHandle(a) => {
                for f in &a.flags {
                    if crate::steps::open_flag(f).is_none() {
                        return Err(self.at(at, format!("unknown open flag `{f}`")));
                    }
                }
            }
            Op::Stat(a) | Op::Lstat(a) if a.layer.is_some() && a.path.is_none() => {
                return Err(self.at(at, "`layer` needs `path`".into()));
            }
            Op::Flock(a) if crate::steps::flock_arg(&a.lock).is_none() => {
                return Err(self.at(
                    at,
                    format!("unknown lock `{}` (exclusive, shared, unlock)", a.lock),
                ));
            }
            Op::Chattr(a) => {
                for f in a.set.iter().chain(&a.clear) {
                    if crate::steps::attr_flag(f).is_none() {
                        return Err(self.at(at, format!("unknown inode flag `{f}`")));
                    }
                }
            }
            Op::Syncfs(a) if a.path.is_none() => {
                return Err(self.at(at, "syncfs needs `path`".into()));
            }
            Op::Fsync(a) if a.fd.is_none() => {
                return Err(self.at(at, "fsync needs `fd`".into()));
            }
            Op::Rename(a) => {
                for f in &a.flags {
                    if crate::steps::rename_flag(f).is_none() {
                        return Err(self.at(
                            at,
                            format!("unknown rename flag `{f}` (NOREPLACE, EXCHANGE, WHITEOUT)"),
                        ));
                    }
                }
            }
            Op::Stat(a) | Op::Lstat(a) if a.path.is_some() == a.fd.is_some() => {
                return Err(self.at(at, "stat needs exactly one of `path` and `fd`".into()));
            }
            Op::Readdir(a) if a.path.is_some() == a.fd.is_some() => {
                return Err(self.at(at, "readdir needs exactly one of `path` and `fd`".into()));
            }
            Op::Offline(a) => {
                let mut known = layer_names(layers);
                if layers.upper.is_some() {
                    known.insert("work".into());
                }
                if !known.contains(&a.layer) {
                    return Err(self.at(
                        at,
                        format!(
                            "unknown layer `{}`; this scenario has {}",
                            a.layer,
                            known.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                self.layer_tree(&a.add)?;
                for r in &a.remove {
                    check_rel_path(r).map_err(|m| self.at(at, format!("path `{r}`: {m}")))?;
                }
            }
            _ => {}
        }
        let expect = match &st.expect {
            Some(e) => self.outcome(e)?,
            None => Outcome::Ok,
        };
        let expect_if = st
            .expect_if
            .iter()
            .map(|c| {
                Ok((
                    self.when(&c.when, &c.expect.referenced)?,
                    self.outcome(&c.expect)?,
                ))
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Step {
            pos: Pos::from(*at),
            op,
            as_user: st.as_user,
            expect,
            expect_if,
        })
    }
}

/// The layer names a scenario has: `lower0`.., `upper`, `data0`..
pub fn layer_names(l: &LayersSpec) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = (0..l.lower.len()).map(|i| format!("lower{i}")).collect();
    s.extend((0..l.data.len()).map(|i| format!("data{i}")));
    if l.upper.is_some() {
        s.insert("upper".into());
    }
    s
}

pub fn node_kinds(n: &NodeSpec) -> Vec<&'static str> {
    let mut k = Vec::new();
    if n.file.is_some() {
        k.push("file");
    }
    if n.size.is_some() && n.file.is_none() {
        k.push("size");
    }
    if n.program.is_some() {
        k.push("program");
    }
    if n.dir.is_some() {
        k.push("dir");
    }
    if n.symlink.is_some() {
        k.push("symlink");
    }
    if n.hardlink.is_some() {
        k.push("hardlink");
    }
    if n.fifo.is_some() {
        k.push("fifo");
    }
    if n.chardev.is_some() {
        k.push("chardev");
    }
    if n.blockdev.is_some() {
        k.push("blockdev");
    }
    if n.socket.is_some() {
        k.push("socket");
    }
    if n.whiteout.is_some() {
        k.push("whiteout");
    }
    if n.absent.is_some() {
        k.push("absent");
    }
    k
}

fn op_paths(op: &Op) -> Vec<&str> {
    match op {
        Op::Open(a) => vec![&a.path],
        Op::Truncate(a) => vec![&a.path],
        Op::Mkdir(a) => vec![&a.path],
        Op::Rmdir(p) | Op::Unlink(p) => vec![p],
        Op::Rename(a) => vec![&a.from, &a.to],
        Op::Link(a) => vec![&a.from, &a.to],
        Op::Symlink(a) => vec![&a.path],
        Op::Readlink(a) => vec![&a.path],
        Op::Mknod(a) => vec![&a.path],
        Op::Chmod(a) => vec![&a.path],
        Op::Chown(a) => vec![&a.path],
        Op::Utimes(a) => vec![&a.path],
        Op::Setxattr(a) => vec![&a.path],
        Op::Getxattr(a) => vec![&a.path],
        Op::Listxattr(a) => vec![&a.path],
        Op::Removexattr(a) => vec![&a.path],
        Op::Stat(a) | Op::Lstat(a) => a.path.iter().map(|s| s.as_str()).collect(),
        Op::Readdir(a) => a.path.iter().map(|s| s.as_str()).collect(),
        Op::Statfs(a) => vec![&a.path],
        Op::Handle(a) => vec![&a.path],
        Op::Exec(a) => vec![&a.path],
        Op::Chattr(a) => vec![&a.path],
        Op::Lsattr(a) => vec![&a.path],
        Op::Syncfs(a) => a.path.iter().map(|s| s.as_str()).collect(),
        _ => vec![],
    }
}

/// A path inside a layer: relative, no `.`/`..`, no empty component.
pub fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.starts_with('/') {
        return Err("absolute paths leave the layer; write it relative to the layer root".into());
    }
    if p.contains('\0') {
        return Err("NUL byte in path".into());
    }
    let trimmed = p.strip_suffix('/').unwrap_or(p);
    for c in trimmed.split('/') {
        match c {
            "" => return Err("empty path component (`//`)".into()),
            "." => return Err("`.` component; write the path without it".into()),
            ".." => return Err("`..` leaves the layer".into()),
            _ => {}
        }
    }
    Ok(())
}

/// A path in the merged view: like a layer path, but `.` means the root and a
/// trailing `/` is kept (it has its own errnos).
fn check_step_path(p: &str) -> Result<(), String> {
    if p == "." {
        return Ok(());
    }
    check_rel_path(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("a/b", true)]
    #[case("a/b/", true)]
    #[case("../x", false)]
    #[case("a/../b", false)]
    #[case("/etc/passwd", false)]
    #[case("a//b", false)]
    #[case("./a", false)]
    #[case("", false)]
    fn rel_paths(#[case] p: &str, #[case] ok: bool) {
        assert_eq!(check_rel_path(p).is_ok(), ok, "{p}");
    }
}
