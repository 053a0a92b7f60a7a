#!/usr/bin/env bash
# Provision a Vagrant machine for the ovlconf suite (see ci/README-vagrant.md).
# Run by the Vagrantfile's shell provisioners, as root, inside the guest:
#
#   vagrant-provision.sh selinux NAME   Fedora: switch SELinux off (the
#                                       provisioner reboots afterwards)
#   vagrant-provision.sh setup NAME     packages, Rust, fuse-overlayfs 2.x (once)
#   vagrant-provision.sh boot NAME      every `vagrant up`: modules, tools mount
#
# Debian/Ubuntu (apt-get) and Fedora (dnf). Idempotent.
#
# Rust: rustup in /opt/rust (RUSTUP_HOME=/opt/rust/rustup, proxies in
# /opt/rust/cargo/bin), with wrappers /usr/local/bin/{cargo,rustc,rustup}
# that set RUSTUP_HOME and PATH themselves. So `sudo /usr/local/bin/cargo`
# works whatever sudo does to the environment (secure_path, HOME), and root
# and vagrant share one toolchain while each keeps its own registry cache
# ($HOME/.cargo).
set -euo pipefail

MODE=${1:?usage: vagrant-provision.sh selinux|setup|boot NAME}
NAME=${2:-$(hostname)}
RUST_ROOT=/opt/rust
TOOLS=/opt/ovlconf/tools
export HOME=${HOME:-/root}

log() { echo "ovlconf-provision[$NAME]: $*"; }
warn() { echo "ovlconf-provision[$NAME]: WARNING: $*" >&2; }

if command -v apt-get >/dev/null; then PM=apt
elif command -v dnf >/dev/null; then PM=dnf
else echo "ovlconf-provision: neither apt-get nor dnf here" >&2; exit 1
fi

# --- selinux -------------------------------------------------------------
selinux_off() {
    if ! command -v getenforce >/dev/null || [ "$(getenforce)" = Disabled ]; then
        log "SELinux is off"
        return
    fi
    # selinux=0 on the kernel command line disables it completely (permissive
    # mode would still label files); the config file follows suit.
    log "switching SELinux off (selinux=0); the machine reboots now"
    if command -v grubby >/dev/null; then
        grubby --update-kernel=ALL --args=selinux=0
    else
        warn "no grubby: add selinux=0 to the kernel command line by hand"
    fi
    if [ -f /etc/selinux/config ]; then
        sed -i 's/^SELINUX=.*/SELINUX=disabled/' /etc/selinux/config
    fi
}

# --- setup ---------------------------------------------------------------
install_packages() {
    if [ $PM = apt ]; then
        export DEBIAN_FRONTEND=noninteractive
        # First boot of a cloud image: unattended-upgrades may hold the lock.
        local apt=(apt-get -q -o DPkg::Lock::Timeout=600)
        "${apt[@]}" update
        "${apt[@]}" install -y --no-install-recommends \
            build-essential pkg-config curl ca-certificates \
            e2fsprogs xfsprogs btrfs-progs util-linux attr kmod \
            fuse3 fuse-overlayfs
        # unionfs-fuse (universe on Ubuntu) is one of the compared FUSE
        # implementations, not needed for the kernel's trials.
        "${apt[@]}" install -y --no-install-recommends unionfs-fuse ||
            warn "unionfs-fuse not installed: its trials will be skipped"
    else
        dnf -y install --setopt=install_weak_deps=False \
            gcc gcc-c++ make pkgconf-pkg-config curl ca-certificates \
            e2fsprogs xfsprogs btrfs-progs util-linux attr kmod \
            fuse3 fuse-overlayfs
        dnf -y install --setopt=install_weak_deps=False unionfs-fuse ||
            warn "unionfs-fuse not installed: its trials will be skipped"
    fi
}

install_rust() {
    if [ ! -x $RUST_ROOT/cargo/bin/rustup ]; then
        log "installing Rust (rustup, minimal profile) into $RUST_ROOT"
        mkdir -p $RUST_ROOT
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            RUSTUP_HOME=$RUST_ROOT/rustup CARGO_HOME=$RUST_ROOT/cargo \
            sh -s -- -y --no-modify-path --profile minimal --default-toolchain stable
    else
        log "Rust already in $RUST_ROOT"
    fi
    local tool
    for tool in cargo rustc rustup; do
        {
            echo '#!/bin/sh'
            echo "# ovlconf (ci/vagrant-provision.sh): the shared rustup install in $RUST_ROOT."
            echo "export RUSTUP_HOME=$RUST_ROOT/rustup"
            # rustup itself must change the shared install; cargo keeps its
            # registry cache in each user's ~/.cargo.
            if [ $tool = rustup ]; then echo "export CARGO_HOME=$RUST_ROOT/cargo"; fi
            echo "PATH=$RUST_ROOT/cargo/bin:\$PATH; export PATH"
            echo "exec $RUST_ROOT/cargo/bin/$tool \"\$@\""
        } > /usr/local/bin/$tool
        chmod 755 /usr/local/bin/$tool
    done
    /usr/local/bin/cargo --version
}

install_fuse_overlayfs_rs() {
    if [ "${OVLCONF_FUSE_OVERLAYFS_RS:-1}" = 0 ]; then
        log "OVLCONF_FUSE_OVERLAYFS_RS=0: not installing fuse-overlayfs 2.x"
        return
    fi
    if [ -x $TOOLS/bin/fuse-overlayfs ]; then
        log "fuse-overlayfs 2.x already in $TOOLS"
        return
    fi
    # The Rust rewrite, which the suite runs from <workspace>/target/tools/bin
    # (cases/implementations.yaml). Built here for this guest's libc and
    # bind-mounted over /vagrant/target/tools by the boot step.
    log "cargo install fuse-overlayfs 2.0.0 into $TOOLS"
    /usr/local/bin/cargo install --quiet --locked fuse-overlayfs --version 2.0.0 --root $TOOLS ||
        warn "cargo install fuse-overlayfs failed: the fuse-overlayfs-rs trials will be skipped"
}

# Shortcut for the documented command (ci/README-vagrant.md).
install_helper() {
    cat > /usr/local/bin/ovlconf-test <<EOF
#!/bin/sh
# ovlconf (ci/vagrant-provision.sh): run the suite in /vagrant on this
# machine's kernel. As root: sudo /usr/local/bin/ovlconf-test [cargo test args]
cd /vagrant || exit 2
if [ "\$(id -u)" = 0 ]; then
    export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-/home/vagrant/target}"
else
    export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-\$HOME/target-user}"
fi
export OVLCONF_RESULTS="\${OVLCONF_RESULTS:-/vagrant/target/vagrant/$NAME/results.json}"
exec /usr/local/bin/cargo test "\$@"
EOF
    chmod 755 /usr/local/bin/ovlconf-test
}

setup() {
    install_packages
    printf '%s\n' overlay loop fuse > /etc/modules-load.d/ovlconf.conf
    install_rust
    install_fuse_overlayfs_rs
    install_helper
}

# --- boot ----------------------------------------------------------------
boot() {
    local m
    for m in overlay loop fuse; do modprobe "$m" 2>/dev/null || true; done
    if [ ! -d /vagrant ] || [ -z "$(ls -A /vagrant 2>/dev/null)" ]; then
        warn "/vagrant is not there (a shared folder after the SELinux reboot?): run 'vagrant reload $NAME'"
        return 0
    fi
    mkdir -p /vagrant/target/tools "/vagrant/target/vagrant/$NAME"
    chown vagrant: "/vagrant/target/vagrant/$NAME" 2>/dev/null || true
    if [ -x $TOOLS/bin/fuse-overlayfs ]; then
        mountpoint -q /vagrant/target/tools || mount --bind $TOOLS /vagrant/target/tools
    fi
    local fs=no
    grep -qw overlay /proc/filesystems && fs=yes
    log "kernel $(uname -r); overlay available: $fs"
    cat <<EOF
ovlconf-provision[$NAME]: run the suite with
  vagrant ssh $NAME -c 'cd /vagrant && sudo env CARGO_TARGET_DIR=/home/vagrant/target OVLCONF_RESULTS=/vagrant/target/vagrant/$NAME/results.json /usr/local/bin/cargo test'
EOF
}

case $MODE in
    selinux) selinux_off ;;
    setup) setup ;;
    boot) boot ;;
    *) echo "ovlconf-provision: unknown mode $MODE" >&2; exit 2 ;;
esac
