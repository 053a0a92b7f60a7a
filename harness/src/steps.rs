//! Stage 4, run steps: each operation on the merged view, its outcome and
//! whatever it returned, recorded for the compare stage.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{makedev, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use crate::errno;
use crate::layers::{self, Stack};
use crate::mount;
use crate::observe::{self, EntryObs, Observer, StepObs};
use crate::scenario::{AsUser, MknodKind, Op, ReaddirArgs, StatArgs, Step};

/// The state steps share: the stack, named fds, identity classes.
pub struct Ctx<'a> {
    pub stack: &'a Stack,
    pub backend: &'a mount::Backend,
    pub mount_opts: String,
    pub fds: HashMap<String, OwnedFd>,
    pub observer: Observer,
    /// Raw (st_dev, st_ino) of each capture name, for same_as/differs_from.
    pub captures: BTreeMap<String, String>,
    pub fsid_captures: BTreeMap<String, String>,
    /// Encoded file handles by name: `struct file_handle` bytes.
    pub handles: BTreeMap<String, Vec<u8>>,
    /// Shared read-only mappings by name.
    pub maps: BTreeMap<String, Mapping>,
    /// Programs started by `exec`, by name; killed when dropped.
    pub programs: BTreeMap<String, Running>,
}

/// A program started from the merged view; killed and reaped on drop.
pub struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A MAP_SHARED, PROT_READ mapping, unmapped on drop.
pub struct Mapping {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

impl Mapping {
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by mmap with this length.
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

pub fn flock_arg(name: &str) -> Option<rustix::fs::FlockOperation> {
    use rustix::fs::FlockOperation as F;
    match name {
        "exclusive" => Some(F::NonBlockingLockExclusive),
        "shared" => Some(F::NonBlockingLockShared),
        "unlock" => Some(F::NonBlockingUnlock),
        _ => None,
    }
}

/// The inode flags scenarios may name (FS_IOC_SETFLAGS bits).
pub const ATTR_FLAGS: &[(&str, rustix::fs::IFlags)] = &[
    ("immutable", rustix::fs::IFlags::IMMUTABLE),
    ("append", rustix::fs::IFlags::APPEND),
    ("nodump", rustix::fs::IFlags::NODUMP),
    ("noatime", rustix::fs::IFlags::NOATIME),
];

pub fn attr_flag(name: &str) -> Option<rustix::fs::IFlags> {
    ATTR_FLAGS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Names of the known flags set in `flags`, in table order.
pub fn attr_flag_names(flags: rustix::fs::IFlags) -> Vec<String> {
    ATTR_FLAGS
        .iter()
        .filter(|(_, f)| flags.contains(*f))
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Set and clear inode flags of an open file.
pub fn change_attr_flags(
    fd: impl AsFd,
    set: &[String],
    clear: &[String],
) -> rustix::io::Result<()> {
    let mut flags = rustix::fs::ioctl_getflags(&fd)?;
    for f in set.iter().filter_map(|n| attr_flag(n)) {
        flags |= f;
    }
    for f in clear.iter().filter_map(|n| attr_flag(n)) {
        flags &= !f;
    }
    rustix::fs::ioctl_setflags(&fd, flags)
}

/// Sectors written so far by the block device holding `dev` (loop-backed
/// layers); None for filesystems without one (tmpfs, btrfs' anonymous dev).
fn sectors_written(dev: u64) -> Option<u64> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let text = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    // Field 7 of the block stat file: sectors written.
    text.split_whitespace().nth(6)?.parse().ok()
}

const MAX_HANDLE_SZ: usize = 128;

pub fn open_flag(name: &str) -> Option<OFlag> {
    match name {
        "O_RDONLY" => Some(OFlag::O_RDONLY),
        _ => OFlag::from_name(name),
    }
}

pub fn rename_flag(name: &str) -> Option<RenameFlags> {
    match name.trim_start_matches("RENAME_") {
        "NOREPLACE" => Some(RenameFlags::RENAME_NOREPLACE),
        "EXCHANGE" => Some(RenameFlags::RENAME_EXCHANGE),
        "WHITEOUT" => Some(RenameFlags::RENAME_WHITEOUT),
        _ => None,
    }
}

type StepResult = Result<StepObs, Errno>;

fn rx(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// name_to_handle_at(AT_FDCWD, path, ..., 0): the handle's bytes.
fn name_to_handle(path: &std::path::Path) -> Result<Vec<u8>, Errno> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let header = std::mem::size_of::<libc::file_handle>();
    // u32-aligned storage for the header plus the largest handle.
    let mut buf = vec![0u32; (header + MAX_HANDLE_SZ).div_ceil(4)];
    let fh = buf.as_mut_ptr() as *mut libc::file_handle;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: fh points at enough zeroed, aligned bytes for the header and
    // MAX_HANDLE_SZ bytes of handle, as handle_bytes says.
    let r = unsafe {
        (*fh).handle_bytes = MAX_HANDLE_SZ as u32;
        libc::name_to_handle_at(libc::AT_FDCWD, c.as_ptr(), fh, &mut mount_id, 0)
    };
    Errno::result(r)?;
    // SAFETY: the kernel filled in the header.
    let used = header + unsafe { (*fh).handle_bytes } as usize;
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(bytes[..used].to_vec())
}

/// open_by_handle_at(mount_fd, handle, flags).
fn open_by_handle(mount_fd: &OwnedFd, handle: &mut [u8], flags: OFlag) -> Result<OwnedFd, Errno> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut words = vec![0u32; handle.len().div_ceil(4)];
    // SAFETY: words has at least handle.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(handle.as_ptr(), words.as_mut_ptr() as *mut u8, handle.len())
    };
    // SAFETY: words holds a complete struct file_handle made by the kernel.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            words.as_mut_ptr() as *mut libc::file_handle,
            flags.bits(),
        )
    };
    Errno::result(fd)?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Ctx<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        if rel == "." {
            return self.stack.merged.clone();
        }
        // Keep a trailing slash: it has its own errnos.
        let mut s = self.stack.merged.as_os_str().as_bytes().to_vec();
        s.push(b'/');
        s.extend_from_slice(rel.as_bytes());
        PathBuf::from(OsStr::from_bytes(&s))
    }

    /// A path in the merged view, or in a layer's directory.
    fn path_in(&self, layer: Option<&str>, rel: &str) -> Result<PathBuf, Errno> {
        match layer {
            None => Ok(self.path(rel)),
            Some(l) => Ok(self.stack.layer_dir(l).ok_or(Errno::ENOENT)?.join(rel)),
        }
    }

    /// Whether the upper's block device wrote while `f` ran.
    fn upper_writes<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Errno>) -> StepResult {
        let dev = self.stack.devs.get("upper").copied();
        let before = dev.and_then(sectors_written);
        f(self)?;
        let after = dev.and_then(sectors_written);
        Ok(StepObs {
            upper_writes: before.zip(after).map(|(b, a)| a > b),
            ..Default::default()
        })
    }

    fn fd(&self, name: &str) -> Result<&OwnedFd, Errno> {
        // A step naming an fd that was never opened is a scenario bug: EBADF.
        self.fds.get(name).ok_or(Errno::EBADF)
    }

    /// Refresh the overlay's st_dev after a (re)mount.
    pub fn note_mounted(&mut self) {
        if let Ok(st) = nix::sys::stat::stat(&self.stack.merged) {
            self.observer.overlay_dev = st.st_dev;
        }
    }

    /// Run one step and record what happened.
    pub fn run(&mut self, step: &Step) -> StepObs {
        let label = step.op.label();
        let result = match step.as_user {
            Some(user) => self.as_user(user, |ctx| ctx.exec(&step.op)),
            None => self.exec(&step.op),
        };
        match result {
            Ok(mut obs) => {
                obs.step = label;
                obs.outcome = "ok".into();
                obs
            }
            Err(e) => StepObs {
                step: label,
                outcome: errno::name(e as i32),
                ..Default::default()
            },
        }
    }

    /// Run with another uid/gid: effective ids switch (dropping the effective
    /// capabilities) and switch back afterwards; the trial is single-threaded.
    fn as_user(&mut self, user: AsUser, f: impl FnOnce(&mut Self) -> StepResult) -> StepResult {
        use nix::unistd::{setgroups, setresgid, setresuid};
        let keep = |r: nix::Result<()>| r.expect("changing ids in the trial process");
        let none_u = Uid::from_raw(u32::MAX);
        let none_g = Gid::from_raw(u32::MAX);
        keep(setgroups(&[Gid::from_raw(user.gid)]));
        keep(setresgid(none_g, Gid::from_raw(user.gid), none_g));
        keep(setresuid(none_u, Uid::from_raw(user.uid), none_u));
        let r = f(self);
        keep(setresuid(none_u, Uid::from_raw(0), none_u));
        keep(setresgid(none_g, Gid::from_raw(0), none_g));
        keep(setgroups(&[]));
        r
    }

    fn exec(&mut self, op: &Op) -> StepResult {
        let io = |e: io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32));
        let ok = || Ok(StepObs::default());
        match op {
            Op::Open(a) => {
                let mut flags = OFlag::empty();
                for f in &a.flags {
                    flags |= open_flag(f).unwrap_or(OFlag::empty());
                }
                let mode = Mode::from_bits_truncate(a.mode.unwrap_or(0o644));
                let path = self.path_in(a.layer.as_deref(), &a.path)?;
                let fd = nix::fcntl::open(&path, flags | OFlag::O_CLOEXEC, mode)?;
                if let Some(name) = &a.fd {
                    self.fds.insert(name.clone(), fd);
                }
                ok()
            }
            Op::Read(a) => {
                let mut buf = vec![0u8; a.len.unwrap_or(64 * 1024)];
                let n = nix::unistd::read(self.fd(&a.fd)?, &mut buf)?;
                Ok(StepObs {
                    data: Some(observe::render_bytes(&buf[..n])),
                    ..Default::default()
                })
            }
            Op::Write(a) => {
                let fd = self.fd(&a.fd)?;
                let n = nix::unistd::write(fd, a.data.as_bytes())?;
                if n != a.data.len() {
                    return Err(Errno::EIO);
                }
                ok()
            }
            Op::Close(name) => {
                self.fds.remove(name).ok_or(Errno::EBADF)?;
                ok()
            }
            Op::Seek(a) => {
                nix::unistd::lseek(self.fd(&a.fd)?, a.offset, nix::unistd::Whence::SeekSet)?;
                ok()
            }
            Op::Truncate(a) => {
                nix::unistd::truncate(&self.path(&a.path), a.size as i64)?;
                ok()
            }
            Op::Ftruncate(a) => {
                nix::unistd::ftruncate(self.fd(&a.fd)?, a.size as i64)?;
                ok()
            }
            Op::Mkdir(a) => {
                nix::unistd::mkdir(
                    &self.path(&a.path),
                    Mode::from_bits_truncate(a.mode.unwrap_or(0o755)),
                )?;
                ok()
            }
            Op::Rmdir(p) => {
                fs::remove_dir(self.path(p)).map_err(io)?;
                ok()
            }
            Op::Unlink(p) => {
                nix::unistd::unlink(&self.path(p))?;
                ok()
            }
            Op::Rename(a) => {
                let mut flags = RenameFlags::empty();
                for f in &a.flags {
                    flags |= rename_flag(f).unwrap_or(RenameFlags::empty());
                }
                let cwd = nix::fcntl::AT_FDCWD;
                nix::fcntl::renameat2(cwd, &self.path(&a.from), cwd, &self.path(&a.to), flags)?;
                ok()
            }
            Op::Link(a) => {
                fs::hard_link(self.path(&a.from), self.path(&a.to)).map_err(io)?;
                ok()
            }
            Op::Symlink(a) => {
                std::os::unix::fs::symlink(&a.target, self.path(&a.path)).map_err(io)?;
                ok()
            }
            Op::Readlink(a) => {
                let t = fs::read_link(self.path(&a.path)).map_err(io)?;
                Ok(StepObs {
                    data: Some(observe::render_bytes(t.as_os_str().as_bytes())),
                    ..Default::default()
                })
            }
            Op::Mknod(a) => {
                let kind = match a.kind {
                    MknodKind::Fifo => SFlag::S_IFIFO,
                    MknodKind::Chardev => SFlag::S_IFCHR,
                    MknodKind::Blockdev => SFlag::S_IFBLK,
                    MknodKind::Socket => SFlag::S_IFSOCK,
                    MknodKind::File => SFlag::S_IFREG,
                };
                let mode = Mode::from_bits_truncate(a.mode.unwrap_or(0o644));
                let dev = makedev(a.rdev[0] as u64, a.rdev[1] as u64);
                nix::sys::stat::mknod(&self.path(&a.path), kind, mode, dev)?;
                ok()
            }
            Op::Chmod(a) => {
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    &self.path(&a.path),
                    Mode::from_bits_truncate(a.mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
                ok()
            }
            Op::Chown(a) => {
                nix::unistd::chown(
                    &self.path(&a.path),
                    a.uid.map(Uid::from_raw),
                    a.gid.map(Gid::from_raw),
                )?;
                ok()
            }
            Op::Utimes(a) => {
                let t = |v: Option<i64>| match (a.now, v) {
                    (true, _) => TimeSpec::UTIME_NOW,
                    (false, Some(s)) => TimeSpec::new(s, 0),
                    (false, None) => TimeSpec::UTIME_OMIT,
                };
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &self.path(&a.path),
                    &t(a.atime),
                    &t(a.mtime),
                    nix::sys::stat::UtimensatFlags::FollowSymlink,
                )?;
                ok()
            }
            Op::Setxattr(a) => {
                xattr::set(self.path(&a.path), &a.name, a.value.as_bytes()).map_err(io)?;
                ok()
            }
            Op::Getxattr(a) => match xattr::get(self.path(&a.path), &a.name).map_err(io)? {
                Some(v) => Ok(StepObs {
                    data: Some(observe::render_bytes(&v)),
                    ..Default::default()
                }),
                None => Err(Errno::ENODATA),
            },
            Op::Listxattr(a) => {
                let mut names: Vec<String> = xattr::list(self.path(&a.path))
                    .map_err(io)?
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(StepObs {
                    names: Some(names),
                    ..Default::default()
                })
            }
            Op::Removexattr(a) => {
                xattr::remove(self.path(&a.path), &a.name).map_err(io)?;
                ok()
            }
            Op::Stat(a) => self.stat(a, true),
            Op::Lstat(a) => self.stat(a, false),
            Op::Readdir(a) => self.readdir(a),
            Op::Statfs(a) => {
                let st = nix::sys::statfs::statfs(&self.path(&a.path))?;
                // fsid_t's words are private; its Debug form shows them.
                let class = self
                    .observer
                    .fsids
                    .class(format!("{:?}", st.filesystem_id()));
                if let Some(name) = &a.capture {
                    self.fsid_captures.insert(name.clone(), class.clone());
                }
                Ok(StepObs {
                    fsid: Some(class),
                    ..Default::default()
                })
            }
            Op::MountCycle => {
                self.cycle(|_| Ok(()))?;
                ok()
            }
            Op::Remount(a) => {
                mount::remount(&self.stack.merged, &a.options, a.api)?;
                ok()
            }
            Op::DropCaches => {
                fs::write("/proc/sys/vm/drop_caches", "2").map_err(io)?;
                ok()
            }
            Op::Offline(a) => {
                let stack = self.stack;
                let dir = match a.layer.as_str() {
                    "work" => stack.work.clone(),
                    l => stack.layer_dir(l).map(|p| p.to_path_buf()),
                }
                .ok_or(Errno::ENOENT)?;
                self.cycle(|_| {
                    if a.recreate {
                        layers::recreate(&dir)?;
                    }
                    for r in &a.remove {
                        layers::remove(&dir, r)?;
                    }
                    layers::populate(&dir, &a.add, stack.xattr_prefix)
                })?;
                ok()
            }
            Op::Flock(a) => {
                let op = flock_arg(&a.lock).ok_or(Errno::EINVAL)?;
                rustix::fs::flock(self.fd(&a.fd)?, op).map_err(rx)?;
                ok()
            }
            Op::Mmap(a) => {
                let len = a.len.unwrap_or(4096);
                // SAFETY: a fresh mapping, owned by the Mapping from here on.
                let ptr = unsafe {
                    rustix::mm::mmap(
                        std::ptr::null_mut(),
                        len,
                        rustix::mm::ProtFlags::READ,
                        rustix::mm::MapFlags::SHARED,
                        self.fd(&a.fd)?,
                        0,
                    )
                }
                .map_err(rx)?;
                self.maps.insert(a.map.clone(), Mapping { ptr, len });
                ok()
            }
            Op::ReadMap(a) => {
                let map = self.maps.get(&a.map).ok_or(Errno::EBADF)?;
                let bytes = map.bytes();
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                Ok(StepObs {
                    data: Some(String::from_utf8_lossy(&bytes[..end]).into_owned()),
                    ..Default::default()
                })
            }
            Op::Handle(a) => {
                let handle = name_to_handle(&self.path(&a.path))?;
                self.handles.insert(a.name.clone(), handle);
                ok()
            }
            Op::OpenHandle(a) => {
                let mut handle = self.handles.get(&a.handle).ok_or(Errno::EBADF)?.clone();
                let mut flags = OFlag::O_CLOEXEC;
                for f in &a.flags {
                    flags |= open_flag(f).unwrap_or(OFlag::empty());
                }
                let root = nix::fcntl::open(
                    &self.stack.merged,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                let fd = open_by_handle(&root, &mut handle, flags)?;
                if let Some(name) = &a.fd {
                    self.fds.insert(name.clone(), fd);
                }
                ok()
            }
            Op::Chattr(a) => {
                let f = fs::File::open(self.path(&a.path)).map_err(io)?;
                change_attr_flags(&f, &a.set, &a.clear).map_err(rx)?;
                ok()
            }
            Op::Lsattr(a) => {
                let f = fs::File::open(self.path(&a.path)).map_err(io)?;
                let flags = rustix::fs::ioctl_getflags(&f).map_err(rx)?;
                Ok(StepObs {
                    names: Some(attr_flag_names(flags)),
                    ..Default::default()
                })
            }
            Op::Syncfs(a) => {
                let path = self.path(a.path.as_deref().unwrap_or("."));
                let f = fs::File::open(path).map_err(io)?;
                self.upper_writes(|_| rustix::fs::syncfs(&f).map_err(rx))
            }
            Op::Fsync(a) => {
                let name = a.fd.clone().unwrap_or_default();
                self.upper_writes(|ctx| rustix::fs::fsync(ctx.fd(&name)?).map_err(rx))
            }
            Op::Exec(a) => {
                use std::os::unix::process::CommandExt;
                let mut cmd = std::process::Command::new(self.path(&a.path));
                cmd.args(&a.args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                // SAFETY: prctl is async-signal-safe; the program must not
                // outlive the trial.
                unsafe {
                    cmd.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                            .map_err(io::Error::from)
                    });
                }
                let child = cmd.spawn().map_err(io)?;
                self.programs.insert(a.name.clone(), Running(child));
                ok()
            }
            Op::Kill(name) => {
                self.programs.remove(name).ok_or(Errno::ESRCH)?;
                ok()
            }
            Op::ExtraMount(a) => {
                let target = self.stack.root.join("extra");
                fs::create_dir_all(&target).map_err(io)?;
                let opts = mount::expand(&a.raw, self.stack);
                mount::mount_overlay_at(&target, &opts)?;
                mount::unmount(&target)?;
                ok()
            }
        }
    }

    /// Unmount (closing every named fd), change things, mount again.
    fn cycle(&mut self, between: impl FnOnce(&Stack) -> io::Result<()>) -> Result<(), Errno> {
        self.fds.clear();
        self.maps.clear();
        self.programs.clear();
        self.backend.unmount(&self.stack.merged)?;
        between(self.stack)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32)))?;
        match self.backend.mount(self.stack, &self.mount_opts) {
            crate::scenario::Outcome::Ok => {
                self.observer.mount_epoch += 1;
                self.note_mounted();
                Ok(())
            }
            crate::scenario::Outcome::Err(name) => Err(Errno::from_raw(
                errno::from_name(&name).unwrap_or(Errno::EIO as i32),
            )),
        }
    }

    fn stat(&mut self, a: &StatArgs, follow: bool) -> StepResult {
        let st = match (&a.path, &a.fd) {
            (Some(p), _) if follow => nix::sys::stat::stat(&self.path_in(a.layer.as_deref(), p)?)?,
            (Some(p), _) => nix::sys::stat::lstat(&self.path_in(a.layer.as_deref(), p)?)?,
            (None, Some(fd)) => nix::sys::stat::fstat(self.fd(fd)?)?,
            (None, None) => return Err(Errno::EINVAL),
        };
        let mut obs = self.observer.stat_obs(&st);
        if a.atime.is_some() {
            obs.atime = Some(if st.st_atime < self.observer.started {
                st.st_atime.to_string()
            } else {
                "recent".into()
            });
        }
        if let Some(name) = &a.capture {
            self.captures.insert(name.clone(), obs.ino.clone());
        }
        Ok(StepObs {
            stat: Some(obs),
            ..Default::default()
        })
    }

    fn readdir(&mut self, a: &ReaddirArgs) -> StepResult {
        let (entries, dir_path): (Vec<observe::RawEntry>, Option<PathBuf>) = match (&a.fd, &a.path)
        {
            (Some(name), _) => {
                let fd = self.fd(name)?;
                if a.rewind {
                    nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekSet)?;
                }
                (
                    observe::read_fd_raw(fd.as_fd())
                        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(5)))?,
                    None,
                )
            }
            (None, Some(p)) => {
                let path = self.path(p);
                let f = fs::File::open(&path)
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(5)))?;
                (
                    observe::read_fd_raw(&f)
                        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(5)))?,
                    Some(path),
                )
            }
            (None, None) => return Err(Errno::EINVAL),
        };
        let mut out = BTreeMap::new();
        for e in entries {
            // d_ino is compared with lstat of the same name in the same dir.
            let st = match (&dir_path, &a.fd) {
                (Some(dir), _) => nix::sys::stat::lstat(&dir.join(&e.name)).ok(),
                (None, Some(name)) => nix::sys::stat::fstatat(
                    self.fd(name)?,
                    e.name.as_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ok(),
                _ => None,
            };
            out.insert(
                e.name,
                EntryObs {
                    d_type: e.d_type,
                    d_ino_matches: match st {
                        Some(st) => self.observer.d_ino_matches(&st, e.ino),
                        None => Some(false),
                    },
                },
            );
        }
        Ok(StepObs {
            entries: Some(out),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    /// The fsid classes rest on fsid_t's Debug form: it must tell
    /// filesystems apart.
    #[test]
    fn fsid_debug_distinguishes_filesystems() {
        let a = nix::sys::statfs::statfs("/").unwrap();
        let b = nix::sys::statfs::statfs("/proc").unwrap();
        let (a, b) = (
            format!("{:?}", a.filesystem_id()),
            format!("{:?}", b.filesystem_id()),
        );
        assert_ne!(a, b, "{a} vs {b}");
    }
}
