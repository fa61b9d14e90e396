#!/bin/sh
# Build the MariaDB server image for the dbbench `docker` back-end without a registry:
# debootstrap a Debian rootfs with mariadb-server, add an entrypoint that behaves like the
# official `mysql` image (MYSQL_ROOT_PASSWORD, extra arguments go to the server), tar it,
# and `podman import` it.
#
#   env/mariadb-image.sh            # no-op when the image exists; reuses the cached tarball
#   env/mariadb-image.sh --rebuild  # debootstrap again
#
# Environment: CQD_MYSQL_IMAGE (default localhost/cqd_mpi-mysql:latest), CQD_CACHE_DIR
# (default /var/cache/cqd_mpi), DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (deb.debian.org).
# Sites that can pull images use env/Dockerfile.mysql instead.
set -eu

image="${CQD_MYSQL_IMAGE:-localhost/cqd_mpi-mysql:latest}"
cache="${CQD_CACHE_DIR:-/var/cache/cqd_mpi}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tarball="$cache/mariadb-rootfs-$suite.tar"

say() { echo "mariadb-image: $*" >&2; }

rebuild=0
case "${1:-}" in
    --rebuild) rebuild=1 ;;
    "") ;;
    *) say "unknown argument '$1'; expected --rebuild or nothing"; exit 2 ;;
esac

if [ "$rebuild" = 0 ] && podman image exists "$image"; then
    exit 0
fi

if [ "$rebuild" = 1 ] || [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null 2>&1 || {
        say "installing debootstrap with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    }
    mkdir -p "$cache"
    work="$(mktemp -d "$cache/rootfs.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    say "debootstrap $suite with mariadb-server into $work (about a minute; log: $cache/debootstrap.log)"
    if ! debootstrap --variant=minbase --include=mariadb-server "$suite" "$work/rootfs" "$mirror" \
        >"$cache/debootstrap.log" 2>&1; then
        say "debootstrap failed; last lines of $cache/debootstrap.log:"
        tail -n 20 "$cache/debootstrap.log" >&2
        exit 1
    fi
    root="$work/rootfs"
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
        "$root"/var/log/*.log "$root"/var/lib/mysql/*
    cat >"$root/usr/local/bin/cqd-mysql-entrypoint" <<'ENTRY'
#!/bin/sh
# Entrypoint of the cqd_mpi MariaDB image: a fresh datadir, root reachable over TCP with
# MYSQL_ROOT_PASSWORD (like the official mysql image), arguments passed on to mariadbd.
set -eu
datadir=/var/lib/mysql
mkdir -p /run/mysqld "$datadir"
chown mysql:mysql /run/mysqld "$datadir"
if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
        --auth-root-authentication-method=normal >/dev/null
fi
password="$(printf '%s' "${MYSQL_ROOT_PASSWORD:-}" | sed "s/\\\\/\\\\\\\\/g; s/'/\\\\'/g")"
cat >/run/mysqld/init.sql <<SQL
CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY '$password';
ALTER USER 'root'@'%' IDENTIFIED BY '$password';
ALTER USER 'root'@'localhost' IDENTIFIED BY '$password';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
SQL
chown mysql:mysql /run/mysqld/init.sql
exec mariadbd --user=mysql --datadir="$datadir" --bind-address=0.0.0.0 --skip-name-resolve \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
    --init-file=/run/mysqld/init.sql "$@"
ENTRY
    chmod 0755 "$root/usr/local/bin/cqd-mysql-entrypoint"
    tar --numeric-owner -C "$root" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$work"
    trap - EXIT
fi

previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
podman import --quiet \
    --change 'ENTRYPOINT ["/usr/local/bin/cqd-mysql-entrypoint"]' \
    --change 'CMD []' \
    --change 'EXPOSE 3306' \
    --message "cqd_mpi MariaDB ($suite) for the dbbench docker back-end" \
    "$tarball" "$image" >/dev/null
if [ -n "$previous" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
say "imported $image from $tarball"
