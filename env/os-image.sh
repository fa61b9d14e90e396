#!/bin/sh
# Build the environments of the AgentBench OS task (`kind: os`) without a registry:
# debootstrap a Debian rootfs with the packages of AgentBench's Dockerfiles, tar it (the
# `bwrap` back-end unpacks that tarball once per node), and `podman import` it (the `docker`
# back-end).
#
#   env/os-image.sh                    # the `default` image; no-op when it is up to date
#   env/os-image.sh packages           # `default` plus npm, as AgentBench's `packages`
#   env/os-image.sh all --rebuild      # debootstrap again
#   env/os-image.sh default --no-import   # the tarball only (bwrap nodes without podman)
#
# AgentBench's `default` is Ubuntu plus python3, python3-pip, git, vim, curl, wget, unzip, zip
# and tree (data/os_interaction/res/dockerfiles/default), installed by apt-get with their
# recommended packages (build-essential, less, openssh-client...); `packages` adds npm. Here
# the base is Debian $DEBIAN_SUITE (minbase, as small as Ubuntu's docker image: no procps,
# no sudo) and the same apt-get install runs in it.
# The tarball is printed on stdout, one line per image.
#
# Environment: CQD_CACHE_DIR (default /var/cache/cqd_mpi), CQD_OS_IMAGE_PREFIX (default
# localhost/cqd_mpi-os-, the tag is PREFIX<name>:latest), DEBIAN_SUITE (bookworm),
# DEBIAN_MIRROR (deb.debian.org). Sites that can pull ubuntu build AgentBench's Dockerfiles
# with `podman build -t localhost/cqd_mpi-os-default:latest -f default .` instead.
set -eu

cache="${CQD_CACHE_DIR:-/var/cache/cqd_mpi}"
prefix="${CQD_OS_IMAGE_PREFIX:-localhost/cqd_mpi-os-}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
common="python3,python3-pip,git,vim,curl,wget,unzip,zip,tree"

say() { echo "os-image: $*" >&2; }

names="" rebuild=0 import=1
for arg in "$@"; do
    case "$arg" in
        default|packages) names="$names $arg" ;;
        all) names="default packages" ;;
        --rebuild) rebuild=1 ;;
        --no-import) import=0 ;;
        *) say "unknown argument '$arg'; expected default, packages, all, --rebuild or --no-import"; exit 2 ;;
    esac
done
[ -n "$names" ] || names=default

build() {
    name=$1
    packages=$common
    [ "$name" = packages ] && packages="$common,npm"
    tarball="$cache/os-$name-rootfs-$suite.tar"
    image="$prefix$name:latest"
    stamp="$suite:$packages:recommends"
    if [ "$rebuild" = 1 ] || [ ! -s "$tarball" ] || [ "$(cat "$tarball.stamp" 2>/dev/null)" != "$stamp" ]; then
        command -v debootstrap >/dev/null 2>&1 || {
            say "installing debootstrap with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
        }
        mkdir -p "$cache/debs"
        work="$(mktemp -d "$cache/os-rootfs.XXXXXX")"
        trap 'rm -rf "$work"' EXIT
        log="$cache/os-$name-debootstrap.log"
        say "debootstrap $suite, then apt-get install $packages into $work (a few minutes; log: $log)"
        root="$work/rootfs"
        if ! debootstrap --variant=minbase --cache-dir="$cache/debs" "$suite" "$root" "$mirror" >"$log" 2>&1; then
            say "debootstrap failed; last lines of $log:"
            tail -n 20 "$log" >&2
            exit 1
        fi
        # As AgentBench's Dockerfile does: apt-get install, recommended packages included.
        mount -t proc proc "$root/proc"
        trap 'umount "$root/proc" 2>/dev/null; rm -rf "$work"' EXIT
        if ! { chroot "$root" apt-get update -q && DEBIAN_FRONTEND=noninteractive chroot "$root" \
            apt-get install -y -q $(echo "$packages" | tr ',' ' ') && chroot "$root" apt-get clean; } >>"$log" 2>&1; then
            say "apt-get install failed; last lines of $log:"
            tail -n 20 "$log" >&2
            exit 1
        fi
        umount "$root/proc"
        rm -rf "$root"/usr/share/doc/* "$root"/usr/share/info/* \
            "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log \
            "$root"/dev/*
        printf 'cqd-os\n' >"$root/etc/hostname"
        tar --numeric-owner -C "$root" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        printf '%s\n' "$stamp" >"$tarball.stamp"
        rm -rf "$work"
        trap - EXIT
        rebuilt=1
    else
        rebuilt=0
    fi
    if [ "$import" = 1 ]; then
        if [ "$rebuilt" = 1 ] || ! podman image exists "$image"; then
            previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
            podman import --quiet --change 'CMD ["bash"]' \
                --message "cqd_mpi AgentBench OS environment '$name' (Debian $suite: $packages)" \
                "$tarball" "$image" >/dev/null
            [ -n "$previous" ] && podman rmi "$previous" >/dev/null 2>&1 || true
            say "imported $image from $tarball"
        fi
    fi
    echo "$tarball"
}

for name in $names; do
    build "$name"
done
