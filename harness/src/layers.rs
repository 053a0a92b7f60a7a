//! Stage 2, build layers: fresh filesystems, then each layer's tree on them.
//!
//! Runs inside the trial's private mount namespace, under the trial root
//! (a tmpfs of its own), so nothing here touches the host's filesystems.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::matrix::{OptionSet, Placement};
use crate::scenario::{
    FsKind, LayersSpec, NestedSpec, NodeSpec, ProgramKind, TreeSpec, WhiteoutForm,
};

/// Everything inside a trial lives below this path, on the trial's tmpfs.
pub const TRIAL_ROOT: &str = "/tmp/ovlconf";

/// The built layer stack: where each layer is and which device it is on.
#[derive(Debug, Clone)]
pub struct Stack {
    pub root: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub merged: PathBuf,
    /// Layer name (`lower0`, `upper`, `data0`) -> st_dev of its filesystem.
    pub devs: BTreeMap<String, u64>,
    /// `trusted.` or `user.`: where overlay keeps its private xattrs.
    pub xattr_prefix: &'static str,
    /// The inner overlay's mount point, for nested stacks.
    pub nested: Option<PathBuf>,
}

impl Stack {
    pub fn layer_dir(&self, name: &str) -> Option<&Path> {
        if name == "upper" {
            return self.upper.as_deref();
        }
        if let Some(i) = name.strip_prefix("lower") {
            return self
                .lowers
                .get(i.parse::<usize>().ok()?)
                .map(|p| p.as_path());
        }
        if let Some(i) = name.strip_prefix("data") {
            return self.data.get(i.parse::<usize>().ok()?).map(|p| p.as_path());
        }
        None
    }
}

/// Make the filesystems and write every layer's tree.
pub fn build(layers: &LayersSpec, fs_kind: FsKind, set: &OptionSet) -> io::Result<Stack> {
    let root = PathBuf::from(TRIAL_ROOT);
    fs::create_dir_all(&root)?;
    let merged = root.join("merged");
    fs::create_dir_all(&merged)?;

    let lower_count = layers.lower.len() + layers.empty_lower_layers;
    let mut names: Vec<String> = (0..lower_count).map(|i| format!("lower{i}")).collect();
    names.extend((0..layers.data.len()).map(|i| format!("data{i}")));
    if layers.upper.is_some() {
        names.push("upper".into());
    }

    // Layers holding owners the user namespace cannot map need a filesystem
    // of the initial namespace (one mounted inside would refuse them).
    let outside_owned: Vec<String> = layers
        .lower
        .iter()
        .enumerate()
        .filter(|(_, t)| t.values().any(|n| n.value.owner_outside_userns))
        .map(|(i, _)| format!("lower{i}"))
        .collect();
    // Filesystem mount point for each layer name.
    let mut fs_of: BTreeMap<String, PathBuf> = BTreeMap::new();
    match set.placement {
        Placement::Samefs => {
            let shared = root.join("fs/all");
            make_fs(&root, "all", fs_kind, &shared)?;
            for n in &names {
                fs_of.insert(n.clone(), shared.clone());
            }
        }
        Placement::Separate => {
            for n in &names {
                let dir = root.join("fs").join(n);
                if outside_owned.contains(n) {
                    fs::create_dir_all(&dir)?;
                    crate::sandbox::mount_from_outside(&dir)?;
                } else {
                    make_fs(&root, n, fs_kind, &dir)?;
                }
                fs_of.insert(n.clone(), dir);
            }
        }
    }

    let prefix = set.xattr_prefix();
    let mut stack = Stack {
        root: root.clone(),
        lowers: vec![],
        upper: None,
        work: None,
        data: vec![],
        merged,
        devs: BTreeMap::new(),
        xattr_prefix: prefix,
        nested: None,
    };
    let empty = TreeSpec::new();
    let lower_trees = layers
        .lower
        .iter()
        .chain(std::iter::repeat_n(&empty, layers.empty_lower_layers));
    for (i, tree) in lower_trees.enumerate() {
        let name = format!("lower{i}");
        let dir = fs_of[&name].join(&name);
        fs::create_dir_all(&dir)?;
        populate(&dir, tree, prefix)?;
        stack.lowers.push(dir);
    }
    for (i, tree) in layers.data.iter().enumerate() {
        let name = format!("data{i}");
        let dir = fs_of[&name].join(&name);
        fs::create_dir_all(&dir)?;
        populate(&dir, tree, prefix)?;
        stack.data.push(dir);
    }
    if let Some(tree) = &layers.upper {
        let base = &fs_of["upper"];
        let upper = base.join("upper");
        let work = base.join("work");
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        populate(&upper, tree, prefix)?;
        stack.upper = Some(upper);
        stack.work = Some(work);
    }
    for n in &names {
        let dir = stack.layer_dir(n).expect("layer just made");
        stack
            .devs
            .insert(n.clone(), nix::sys::stat::stat(dir)?.st_dev);
    }
    if let Some(nested) = &layers.nested {
        stack.nested = Some(build_nested(&root, nested, prefix)?);
    }
    for n in &layers.read_only {
        let dir = stack.layer_dir(n).expect("validated layer name");
        // A read-only bind mount of the layer onto itself.
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
    }
    Ok(stack)
}

/// The inner overlay of a nested stack, on its own tmpfs, mounted with
/// mount(2); the trial's namespace takes it down with everything else.
fn build_nested(root: &Path, spec: &NestedSpec, prefix: &str) -> io::Result<PathBuf> {
    let base = root.join("nested");
    make_fs(root, "nested", FsKind::Tmpfs, &base)?;
    let mut lowers = Vec::new();
    for (i, tree) in spec.lower.iter().enumerate() {
        let dir = base.join(format!("lower{i}"));
        fs::create_dir_all(&dir)?;
        populate(&dir, tree, prefix)?;
        lowers.push(dir.display().to_string());
    }
    let mut opts = format!("lowerdir={}", lowers.join(":"));
    if let Some(tree) = &spec.upper {
        let (upper, work) = (base.join("upper"), base.join("work"));
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        populate(&upper, tree, prefix)?;
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
    }
    if prefix == "user." {
        opts.push_str(",userxattr");
    }
    let merged = base.join("merged");
    fs::create_dir_all(&merged)?;
    crate::mount::mount_overlay_at(&merged, &opts)
        .map_err(|e| io::Error::other(format!("mounting the nested overlay ({opts}): {e}")))?;
    Ok(merged)
}

/// Swap a layer's directory for a new, empty one at the same path.
pub fn recreate(dir: &Path) -> io::Result<()> {
    let aside = dir.with_extension("replaced");
    fs::rename(dir, &aside)?;
    fs::create_dir(dir)?;
    let st = nix::sys::stat::stat(&aside)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(st.st_mode & 0o7777))?;
    Ok(())
}

/// A fresh filesystem at `dir`: a tmpfs, or a loop image on the trial tmpfs.
pub fn make_fs(root: &Path, name: &str, kind: FsKind, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if kind == FsKind::Tmpfs {
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )?;
        return Ok(());
    }
    let img_dir = root.join("img");
    fs::create_dir_all(&img_dir)?;
    let img = img_dir.join(format!("{name}.img"));
    // The smallest sizes each mkfs accepts, sparse on the trial tmpfs.
    let (size, mkfs, args): (u64, &str, &[&str]) = match kind {
        // 4 KiB blocks so fs-verity's 4 KiB Merkle blocks fit on every kernel.
        FsKind::Ext4 => (
            64 << 20,
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096", "-O", "^has_journal,verity"],
        ),
        FsKind::Xfs => (320 << 20, "mkfs.xfs", &["-q", "-f"]),
        FsKind::Btrfs => (128 << 20, "mkfs.btrfs", &["-q", "-f"]),
        FsKind::Tmpfs => unreachable!(),
    };
    fs::File::create(&img)?.set_len(size)?;
    run(Command::new(mkfs).args(args).arg(&img))?;
    // mount(8) sets up the loop device with autoclear, so the device goes
    // away with the mount when the trial's namespace dies.
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&img)
        .arg(dir))?;
    Ok(())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The real xattr name for a scenario's name: `overlay.*` gets the prefix.
pub fn xattr_name(name: &str, prefix: &str) -> String {
    if name.starts_with("overlay.") {
        format!("{prefix}{name}")
    } else {
        name.to_string()
    }
}

/// Write a tree into `dir`. Order: objects, then hardlinks, then attributes,
/// then times deepest first (creating children changes a directory's mtime).
pub fn populate(dir: &Path, tree: &TreeSpec, prefix: &str) -> io::Result<()> {
    let ctx = |p: &str, e: io::Error| io::Error::new(e.kind(), format!("building `{p}`: {e}"));
    for (rel, node) in tree {
        let n = &node.value;
        if n.hardlink.is_some() {
            continue;
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            make_parents(parent).map_err(|e| ctx(rel, e))?;
        }
        create(&path, n, prefix).map_err(|e| ctx(rel, e))?;
    }
    for (rel, node) in tree {
        if let Some(target) = &node.value.hardlink {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                make_parents(parent).map_err(|e| ctx(rel, e))?;
            }
            fs::hard_link(dir.join(target), &path).map_err(|e| ctx(rel, e))?;
        }
    }
    for (rel, node) in tree {
        attributes(&dir.join(rel), &node.value, prefix).map_err(|e| ctx(rel, e))?;
    }
    for (rel, node) in tree.iter().rev() {
        if let Some(t) = node.value.mtime {
            let ts = TimeSpec::new(t, 0);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &dir.join(rel),
                &ts,
                &ts,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| ctx(rel, e.into()))?;
        }
    }
    // After times and modes: once the owner is foreign, the namespace's
    // root may not change the inode any more.
    for (rel, _) in tree.iter().filter(|(_, n)| n.value.owner_outside_userns) {
        crate::sandbox::chown_from_outside(&dir.join(rel)).map_err(|e| ctx(rel, e))?;
    }
    for (rel, _) in tree.iter().filter(|(_, n)| n.value.verity) {
        enable_verity(&dir.join(rel)).map_err(|e| ctx(rel, e))?;
    }
    // Last: an immutable inode refuses every change above.
    for (rel, node) in tree.iter().filter(|(_, n)| !n.value.attr_flags.is_empty()) {
        let f = fs::File::open(dir.join(rel)).map_err(|e| ctx(rel, e))?;
        crate::steps::change_attr_flags(&f, &node.value.attr_flags, &[])
            .map_err(|e| ctx(rel, e.into()))?;
    }
    Ok(())
}

/// A static x86-64 ELF executable: `loop { pause() }`. Built in, so the
/// layer's bytes are the same on every machine and kernel.
pub fn pause_program() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    // mov eax, 34 (pause); syscall; jmp back to the mov.
    const CODE: [u8; 9] = [0xb8, 0x22, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7];
    let total = HEADERS + CODE.len() as u64;
    let mut elf = Vec::with_capacity(total as usize);
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0, BASE, BASE, total, total, 0x1000u64] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&CODE);
    elf
}

/// FS_IOC_ENABLE_VERITY with SHA-256 and 4 KiB blocks, no salt.
pub fn enable_verity(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // struct fsverity_enable_arg (linux/fsverity.h), 128 bytes.
    #[repr(C)]
    struct EnableArg {
        version: u32,
        hash_algorithm: u32,
        block_size: u32,
        salt_size: u32,
        salt_ptr: u64,
        sig_size: u32,
        reserved1: u32,
        sig_ptr: u64,
        reserved2: [u64; 11],
    }
    const FS_IOC_ENABLE_VERITY: libc::c_ulong = 0x4080_6685;
    let arg = EnableArg {
        version: 1,
        hash_algorithm: 1,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    let f = fs::File::open(path)?;
    // SAFETY: a valid fd and a fully initialised argument of the ioctl's size.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_ENABLE_VERITY, &arg) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("enabling fs-verity: {e}")));
    }
    Ok(())
}

/// Directories a tree does not list are made 0755, like `mkdir -p`.
fn make_parents(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

/// Default modes: the trial runs with umask 0, so say them explicitly.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

fn create(path: &Path, n: &NodeSpec, prefix: &str) -> io::Result<()> {
    let dev = |mm: [u32; 2]| makedev(mm[0] as u64, mm[1] as u64);
    if let Some(content) = &n.file {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?
            .write_all(content.as_bytes())?;
        if let Some(size) = n.size {
            fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(size)?;
        }
    } else if let Some(size) = n.size {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?
            .set_len(size)?;
    } else if let Some(ProgramKind::Pause) = n.program {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(path)?
            .write_all(&pause_program())?;
    } else if n.dir.is_some() {
        match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            r => r?,
        }
    } else if let Some(target) = &n.symlink {
        symlink(target, path)?;
    } else if n.fifo.is_some() {
        mknod(path, SFlag::S_IFIFO, Mode::from_bits_truncate(FILE_MODE), 0)?;
    } else if let Some(mm) = n.chardev {
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o644),
            dev(mm),
        )?;
    } else if let Some(mm) = n.blockdev {
        mknod(
            path,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o644),
            dev(mm),
        )?;
    } else if n.socket.is_some() {
        mknod(path, SFlag::S_IFSOCK, Mode::from_bits_truncate(0o644), 0)?;
    } else if let Some(form) = n.whiteout {
        match form {
            WhiteoutForm::Chardev => mknod(path, SFlag::S_IFCHR, Mode::empty(), 0)?,
            WhiteoutForm::Xattr => {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .open(path)?;
                xattr::set(path, xattr_name("overlay.whiteout", prefix), b"")?;
            }
        }
    }
    Ok(())
}

fn attributes(path: &Path, n: &NodeSpec, prefix: &str) -> io::Result<()> {
    if let Some(mark) = n.opaque {
        xattr::set(
            path,
            xattr_name("overlay.opaque", prefix),
            mark.value().as_bytes(),
        )?;
    }
    for (name, value) in &n.xattrs {
        let value = value.as_deref().unwrap_or("");
        xattr::set(path, xattr_name(name, prefix), value.as_bytes())?;
    }
    if n.uid.is_some() || n.gid.is_some() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            n.uid.map(Uid::from_raw),
            n.gid.map(Gid::from_raw),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    // chmod after chown: chown clears set-id bits.
    if let Some(mode) = n.mode {
        if n.symlink.is_none() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Remove paths from a layer (an offline change), whatever their type.
pub fn remove(dir: &Path, rel: &str) -> io::Result<()> {
    let path = dir.join(rel);
    match fs::symlink_metadata(&path)? {
        m if m.is_dir() => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    }
}
