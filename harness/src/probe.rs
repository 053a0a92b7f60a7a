//! Feature probes, in the spirit of xfstests' `_require_*`: each one really
//! tries the thing on the running kernel, in a sandbox, once per run. A
//! scenario `requires:` features by name; an unmet one skips the trial and
//! the skip shows the probe's reason. Never a kernel version check.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

/// Every feature a scenario may name, with what its probe tries.
pub const FEATURES: &[(&str, &str)] = &[
    (
        "root",
        "running as real root (CAP_SYS_ADMIN in the initial user namespace)",
    ),
    (
        "userns_overlay",
        "an overlay mount with userxattr inside a new user namespace",
    ),
    ("tmpfs_user_xattr", "user.* xattrs on tmpfs"),
    (
        "xattr_whiteout",
        "a zero-size file with overlay.whiteout in a lower layer acts as a whiteout",
    ),
    (
        "data_only_layers",
        "lowerdir=a::b data-only layers (with metacopy=on)",
    ),
    ("new_mount_api", "fsopen(\"overlay\")"),
    ("lowerdir_append", "fsconfig lowerdir+"),
    (
        "overlay_fs_context",
        "overlay parses fsconfig parameters itself (its own fs_context, not the VFS legacy one): fsconfig refuses an unknown parameter at once",
    ),
    (
        "data_only_without_metacopy",
        "lowerdir=a::b data-only layers without metacopy=on (6.16+; 6.5-6.15 refuse them)",
    ),
    (
        "layer_fds",
        "fsconfig_set_fd of lowerdir+ / upperdir / workdir: layers passed as file descriptors (6.13+)",
    ),
    (
        "override_creds_option",
        "the override_creds / nooverride_creds mount flags (6.15+)",
    ),
    (
        "verity_option",
        "the verity= mount option (6.6+; verity=off is accepted without fs-verity support)",
    ),
    ("uuid_null", "the uuid=null mount option"),
    (
        "uuid_auto",
        "the uuid=auto mount option (uuid=auto is then the default, so mountinfo lists the resolved uuid=on)",
    ),
    (
        "fsync_option",
        "the fsync=auto|strict|volatile mount option (mountinfo shows `volatile` as fsync=volatile)",
    ),
    (
        "mountinfo_shows_implied_redirect_dir",
        "mountinfo of a metacopy=on mount lists the redirect_dir=on that metacopy=on implies",
    ),
    (
        "overlay_xattr_escapes",
        "setxattr of trusted.overlay.X through the overlay is accepted and stored escaped as trusted.overlay.overlay.X",
    ),
    ("fs_ext4", "mkfs.ext4 and a loop-mounted ext4"),
    ("fs_xfs", "mkfs.xfs and a loop-mounted xfs"),
    ("fs_btrfs", "mkfs.btrfs and a loop-mounted btrfs"),
    (
        "fs_verity",
        "fs-verity on the layers' ext4 (FS_IOC_ENABLE_VERITY, SHA-256, 4 KiB blocks)",
    ),
];

pub fn feature_names() -> Vec<&'static str> {
    FEATURES.iter().map(|(n, _)| *n).collect()
}

/// Feature -> None when present, Some(reason) when missing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Features {
    pub missing: BTreeMap<String, String>,
    pub present: Vec<String>,
    /// Implementation -> option set -> None if its daemon mounted with that
    /// set's options, Some(why not) otherwise.
    #[serde(default)]
    pub implementation_sets: BTreeMap<String, BTreeMap<String, Option<String>>>,
}

impl Features {
    pub fn has(&self, name: &str) -> bool {
        self.present.iter().any(|p| p == name)
    }

    /// The first unmet requirement, as a skip reason.
    pub fn unmet(&self, required: &[String]) -> Option<String> {
        required.iter().find(|r| !self.has(r)).map(|r| {
            let why = self
                .missing
                .get(r)
                .cloned()
                .unwrap_or_else(|| "not probed".into());
            format!("requires {r}: {why}")
        })
    }
}

/// A FUSE implementation's option sets to try: name, backend, set options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImplementationProbe {
    pub name: String,
    pub style: crate::implementation::Style,
    pub argv: Vec<String>,
    pub sets: Vec<(String, Vec<String>)>,
    /// The program opened before the sandbox (see `Backend::pin`).
    #[serde(default)]
    pub pinned: Option<String>,
}

/// Mount each implementation on a tiny stack with each set's options.
pub fn probe_implementations(
    list: &[ImplementationProbe],
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    for (i, imp) in list.iter().enumerate() {
        let backend = crate::mount::Backend {
            style: imp.style,
            argv: imp.argv.clone(),
            fsopen_params: None,
            pinned: imp.pinned.clone(),
        };
        let mut sets = BTreeMap::new();
        for (j, (set, options)) in imp.sets.iter().enumerate() {
            let dir = Path::new("/tmp/probe/impl").join(format!("{i}-{j}"));
            let r = scratch(&dir).and_then(|()| {
                let stack = crate::layers::Stack {
                    root: dir.clone(),
                    lowers: vec![dir.join("l")],
                    upper: Some(dir.join("u")),
                    work: Some(dir.join("w")),
                    data: vec![],
                    merged: dir.join("m"),
                    devs: Default::default(),
                    xattr_prefix: "trusted.",
                    nested: None,
                };
                let set = crate::matrix::OptionSet {
                    options: options.clone(),
                    ..Default::default()
                };
                let opts = crate::mount::options(&stack, &set, &Default::default());
                match backend.mount(&stack, &opts) {
                    crate::scenario::Outcome::Ok => {
                        let ignored: Vec<String> = crate::mount::daemon_ignored_options()
                            .into_iter()
                            .filter(|o| options.contains(o))
                            .collect();
                        backend
                            .unmount(&stack.merged)
                            .map_err(|e| format!("unmount: {e}"))?;
                        if ignored.is_empty() {
                            Ok(())
                        } else {
                            Err(format!("the daemon ignores `{}`", ignored.join(",")))
                        }
                    }
                    crate::scenario::Outcome::Err(e) => {
                        Err(format!("mount with `{}` {e}", options.join(",")))
                    }
                }
            });
            sets.insert(set.clone(), r.err());
        }
        out.insert(imp.name.clone(), sets);
    }
    out
}

/// Features that are just "overlay accepts these options": (feature,
/// scratch dir, options with $L $D $U $W for the scratch layers).
const OPTION_PROBES: &[(&str, &str, &str)] = &[
    (
        "data_only_layers",
        "dol",
        "lowerdir=$L::$D,upperdir=$U,workdir=$W,metacopy=on",
    ),
    (
        "data_only_without_metacopy",
        "dolnm",
        "lowerdir=$L::$D,upperdir=$U,workdir=$W",
    ),
    (
        "override_creds_option",
        "oc",
        "lowerdir=$L,upperdir=$U,workdir=$W,override_creds",
    ),
    (
        "verity_option",
        "vo",
        "lowerdir=$L,upperdir=$U,workdir=$W,metacopy=on,redirect_dir=on,verity=off",
    ),
    (
        "uuid_null",
        "uuid",
        "lowerdir=$L,upperdir=$U,workdir=$W,uuid=null",
    ),
    (
        "uuid_auto",
        "uuida",
        "lowerdir=$L,upperdir=$U,workdir=$W,uuid=auto",
    ),
    (
        "fsync_option",
        "fsync",
        "lowerdir=$L,upperdir=$U,workdir=$W,fsync=strict",
    ),
];

/// Runs inside a sandbox child: try each feature.
pub fn probe_all(root: bool) -> Features {
    let mut f = Features::default();
    let base = Path::new("/tmp/probe");
    let results: Vec<(&str, Result<(), String>)> = vec![
        (
            "root",
            if root {
                Ok(())
            } else {
                Err("not running as root".into())
            },
        ),
        ("userns_overlay", in_forked(probe_userns_overlay)),
        ("tmpfs_user_xattr", probe_tmpfs_user_xattr(&base.join("ux"))),
        (
            "xattr_whiteout",
            probe_xattr_whiteout(&base.join("xw"), root),
        ),
        ("layer_fds", probe_layer_fds(&base.join("lfd"))),
        ("new_mount_api", probe_fsopen(None)),
        ("lowerdir_append", probe_fsopen(Some(&base.join("lda")))),
        ("overlay_fs_context", probe_overlay_fs_context()),
        (
            "mountinfo_shows_implied_redirect_dir",
            probe_implied_redirect_dir(&base.join("mcrd")),
        ),
        (
            "overlay_xattr_escapes",
            probe_overlay_xattr_escapes(&base.join("esc"), root),
        ),
        (
            "fs_ext4",
            probe_loop_fs(&base.join("ext4"), crate::scenario::FsKind::Ext4),
        ),
        (
            "fs_xfs",
            probe_loop_fs(&base.join("xfs"), crate::scenario::FsKind::Xfs),
        ),
        (
            "fs_btrfs",
            probe_loop_fs(&base.join("btrfs"), crate::scenario::FsKind::Btrfs),
        ),
        ("fs_verity", probe_fs_verity(&base.join("verity"))),
    ];
    let option_results = OPTION_PROBES
        .iter()
        .map(|(name, dir, opts)| (*name, probe_overlay(&base.join(dir), opts)));
    for (name, r) in results.into_iter().chain(option_results) {
        match r {
            Ok(()) => f.present.push(name.to_string()),
            Err(why) => {
                f.missing.insert(name.to_string(), why);
            }
        }
    }
    f
}

fn errtext(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// A tmpfs with lower, data, upper, work and merged dirs.
fn scratch(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| errtext("mkdir", e))?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| errtext("tmpfs", e))?;
    for d in ["l", "d", "u", "w", "m"] {
        fs::create_dir(dir.join(d)).map_err(|e| errtext("mkdir", e))?;
    }
    Ok(())
}

fn expand(dir: &Path, opts: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    opts.replace("$L", &p("l"))
        .replace("$D", &p("d"))
        .replace("$U", &p("u"))
        .replace("$W", &p("w"))
}

fn probe_overlay(dir: &Path, opts: &str) -> Result<(), String> {
    scratch(dir)?;
    let opts = expand(dir, opts);
    mount(
        Some("overlay"),
        &dir.join("m"),
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| {
        format!(
            "mount -o {} gave {}",
            opts.replace(&dir.display().to_string(), "."),
            crate::errno::name(e as i32)
        )
    })
}

fn probe_tmpfs_user_xattr(dir: &Path) -> Result<(), String> {
    scratch(dir)?;
    let f = dir.join("l/f");
    fs::write(&f, "").map_err(|e| errtext("create", e))?;
    xattr::set(&f, "user.probe", b"1")
        .map_err(|e| format!("setxattr user.* on tmpfs: {}", crate::errno::of_io(&e)))
}

fn probe_xattr_whiteout(dir: &Path, root: bool) -> Result<(), String> {
    if !root {
        return Err("needs trusted.* xattrs (root) to build the probe".into());
    }
    scratch(dir)?;
    let d = dir.join("l/d");
    fs::create_dir(&d).map_err(|e| errtext("mkdir", e))?;
    fs::write(d.join("gone"), "").map_err(|e| errtext("create", e))?;
    xattr::set(d.join("gone"), "trusted.overlay.whiteout", b"")
        .map_err(|e| errtext("setxattr", e))?;
    xattr::set(&d, "trusted.overlay.opaque", b"x").map_err(|e| errtext("setxattr", e))?;
    probe_overlay_mounted(dir, "lowerdir=$L,upperdir=$U,workdir=$W")?;
    match fs::symlink_metadata(dir.join("m/d/gone")) {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => Ok(()),
        Ok(_) => Err("the xattr whiteout is visible as a file".into()),
        Err(e) => Err(errtext("lookup", e)),
    }
}

/// Mount with metacopy=on alone and read back what mountinfo lists.
fn probe_implied_redirect_dir(dir: &Path) -> Result<(), String> {
    scratch(dir)?;
    probe_overlay_mounted(dir, "lowerdir=$L,upperdir=$U,workdir=$W,metacopy=on")?;
    let opts = crate::mount::mountinfo_options(&dir.join("m"))
        .ok_or_else(|| "the metacopy=on mount is not in mountinfo".to_string())?;
    if !opts.iter().any(|o| o == "metacopy=on") {
        return Err(format!("mountinfo lacks metacopy=on: {}", opts.join(",")));
    }
    if opts.iter().any(|o| o == "redirect_dir=on") {
        Ok(())
    } else {
        Err(format!(
            "mountinfo of a metacopy=on mount lists no redirect_dir=on: {}",
            opts.iter()
                .filter(|o| !o.contains('/'))
                .cloned()
                .collect::<Vec<_>>()
                .join(",")
        ))
    }
}

/// Set trusted.overlay.probe on a lower file through the overlay; the
/// upper copy must then carry it as trusted.overlay.overlay.probe.
fn probe_overlay_xattr_escapes(dir: &Path, root: bool) -> Result<(), String> {
    if !root {
        return Err("needs trusted.* xattrs (root) to try it".into());
    }
    scratch(dir)?;
    fs::write(dir.join("l/f"), "").map_err(|e| errtext("create", e))?;
    probe_overlay_mounted(dir, "lowerdir=$L,upperdir=$U,workdir=$W")?;
    xattr::set(dir.join("m/f"), "trusted.overlay.probe", b"1").map_err(|e| {
        format!(
            "setxattr trusted.overlay.probe through the overlay: {}",
            crate::errno::of_io(&e)
        )
    })?;
    match xattr::get(dir.join("u/f"), "trusted.overlay.overlay.probe") {
        Ok(Some(v)) if v == b"1" => Ok(()),
        Ok(v) => Err(format!(
            "the upper copy has trusted.overlay.overlay.probe = {v:?}, not \"1\""
        )),
        Err(e) => Err(errtext("getxattr on the upper copy", e)),
    }
}

fn probe_overlay_mounted(dir: &Path, opts: &str) -> Result<(), String> {
    let opts = expand(dir, opts);
    mount(
        Some("overlay"),
        &dir.join("m"),
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| errtext("overlay mount", crate::errno::name(e as i32)))
}

fn probe_fsopen(append_dir: Option<&Path>) -> Result<(), String> {
    use rustix::mount::{fsconfig_create, fsconfig_set_string, fsopen, FsOpenFlags};
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| format!("fsopen(overlay): {}", crate::errno::name(e.raw_os_error())))?;
    let Some(dir) = append_dir else { return Ok(()) };
    scratch(dir)?;
    let l = dir.join("l").display().to_string();
    fsconfig_set_string(&fs, "lowerdir+", l.as_str()).map_err(|e| {
        format!(
            "fsconfig lowerdir+: {}",
            crate::errno::name(e.raw_os_error())
        )
    })?;
    fsconfig_set_string(
        &fs,
        "lowerdir+",
        dir.join("d").display().to_string().as_str(),
    )
    .map_err(|e| {
        format!(
            "fsconfig lowerdir+: {}",
            crate::errno::name(e.raw_os_error())
        )
    })?;
    fsconfig_create(&fs).map_err(|e| {
        format!(
            "fsconfig create with lowerdir+: {}",
            crate::errno::name(e.raw_os_error())
        )
    })
}

/// Every layer as an O_PATH fd through fsconfig_set_fd.
fn probe_layer_fds(dir: &Path) -> Result<(), String> {
    use rustix::mount::{fsconfig_create, fsconfig_set_fd, fsopen, FsOpenFlags};
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| format!("fsopen(overlay): {}", crate::errno::name(e.raw_os_error())))?;
    scratch(dir)?;
    for (key, sub) in [("lowerdir+", "l"), ("upperdir", "u"), ("workdir", "w")] {
        let fd = rustix::fs::open(
            dir.join(sub),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| errtext("open O_PATH", e))?;
        fsconfig_set_fd(&fs, key, &fd).map_err(|e| {
            format!(
                "fsconfig_set_fd {key}: {}",
                crate::errno::name(e.raw_os_error())
            )
        })?;
    }
    fsconfig_create(&fs).map_err(|e| {
        format!(
            "fsconfig create with layer fds: {}",
            crate::errno::name(e.raw_os_error())
        )
    })
}

/// With the VFS legacy fs_context (overlay without its own, before 6.5)
/// fsconfig stores any key=value for mount time; overlay's own parser
/// refuses an unknown key in fsconfig itself.
fn probe_overlay_fs_context() -> Result<(), String> {
    use rustix::mount::{fsconfig_set_string, fsopen, FsOpenFlags};
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| format!("fsopen(overlay): {}", crate::errno::name(e.raw_os_error())))?;
    match fsconfig_set_string(&fs, "ovlconf_no_such_option", "1") {
        Err(e) if e.raw_os_error() == nix::errno::Errno::EINVAL as i32 => Ok(()),
        Err(e) => Err(format!(
            "fsconfig of an unknown parameter gave {}, not EINVAL",
            crate::errno::name(e.raw_os_error())
        )),
        Ok(()) => Err("fsconfig accepts an unknown parameter (legacy fs_context: options are parsed only at mount time)".into()),
    }
}

/// The layers' own filesystem maker, on a scratch directory.
fn probe_loop_fs(dir: &Path, kind: crate::scenario::FsKind) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| errtext("mkdir", e))?;
    crate::layers::make_fs(dir, "probe", kind, &dir.join("m")).map_err(|e| e.to_string())
}

/// fs-verity on a file of the layers' ext4.
fn probe_fs_verity(dir: &Path) -> Result<(), String> {
    probe_loop_fs(dir, crate::scenario::FsKind::Ext4)?;
    let f = dir.join("m/f");
    fs::write(&f, "verity").map_err(|e| errtext("create", e))?;
    crate::layers::enable_verity(&f).map_err(|e| e.to_string())
}

/// Run a probe in a forked child (it may enter namespaces of its own).
fn in_forked(probe: fn() -> Result<(), String>) -> Result<(), String> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    let (r, w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: the probe child is single-threaded.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            drop(r);
            let msg = match probe() {
                Ok(()) => String::new(),
                Err(e) => e,
            };
            let _ = nix::unistd::write(&w, msg.as_bytes());
            std::process::exit(0)
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut msg = Vec::new();
            let _ = std::io::Read::read_to_end(&mut fs::File::from(r), &mut msg);
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) if msg.is_empty() => Ok(()),
                Ok(WaitStatus::Exited(_, 0)) => Err(String::from_utf8_lossy(&msg).into_owned()),
                other => Err(format!("probe child ended with {other:?}")),
            }
        }
    }
}

fn probe_userns_overlay() -> Result<(), String> {
    use nix::sched::{unshare, CloneFlags};
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWUSER): {e}"))?;
    fs::write("/proc/self/uid_map", format!("0 {uid} 1")).map_err(|e| errtext("uid_map", e))?;
    fs::write("/proc/self/setgroups", "deny").map_err(|e| errtext("setgroups", e))?;
    fs::write("/proc/self/gid_map", format!("0 {gid} 1")).map_err(|e| errtext("gid_map", e))?;
    let dir = Path::new("/tmp/probe/userns");
    scratch(dir)?;
    probe_overlay_mounted(dir, "lowerdir=$L,upperdir=$U,workdir=$W,userxattr")
}
