"""One identity per bwrap environment (cqd_mpi/sandboxes/uidrange.py): a uid range of its own,
so an item's `chown` to a user it creates works as on docker, and no two environments share a
host uid; the idmapped rootfs leaves nothing mounted on the host."""

import os
import signal
import subprocess
import sys

import pytest

from cqd_mpi.sandboxes import uidrange
from tests.conftest import subprocess_env
from tests.sandboxes.osenv_helpers import make_env, rootfs_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid ranges need a root worker (CI runs as root)")


def host_mounts(lowers: list[str]) -> list[str]:
    """The host's mounts of these slots' rootfs (other tests' environments, in other xdist
    groups, mount and detach their own slots meanwhile)."""
    with open("/proc/self/mountinfo") as handle:
        return [line for line in handle if any(f" {lower} " in line for lower in lowers)]


def test_items_chown_to_users_they_create_and_no_two_share_a_uid():
    assert uidrange.usable() == (True, "")
    rootfs_dir()
    first, second = make_env("bwrap"), make_env("bwrap")
    lowers = [first.ids.lower, second.ids.lower]
    try:
        assert host_mounts(lowers) == []
        out = first.shell().run("useradd -m jack && touch /t && chown jack:jack /t && stat -c '%U %G' /t; "
                                "su jack -c 'id -un; touch ~/mine' && ls -l /home/jack/mine | cut -d' ' -f3").text
        assert out.split() == ["jack", "jack", "jack", "jack"], out
        maps = [env.exec(["cat", "/proc/self/uid_map"]).output.split() for env in (first, second)]
        assert [m[0] for m in maps] == [b"0", b"0"] and [m[2] for m in maps] == [b"65536", b"65536"]
        bases = {int(m[1]) for m in maps}
        assert len(bases) == 2 and all(b > uidrange.SANDBOX_UID and (b - uidrange.SANDBOX_UID) % uidrange.SIZE == 0 for b in bases)
        assert first.exec(["stat", "-c", "%u", "/etc/passwd"]).output == b"0\n"  # the rootfs is root's inside
    finally:
        first.close()
        second.close()
    assert host_mounts(lowers) == []


def test_the_mount_a_killed_worker_left_is_swept_and_a_live_environments_kept(tmp_path, monkeypatch):
    """A worker SIGKILLed between mounting its slot's rootfs and `detach` leaves it on the host;
    `sweep` takes it off (its lock is free) and leaves the slot a live environment holds."""
    slots, tree = tmp_path / "slots", tmp_path / "tree"
    tree.mkdir()
    monkeypatch.setattr(uidrange, "SLOT_DIR", slots)
    live = uidrange.UidRange(str(tree))
    try:
        killed = subprocess.run(
            [sys.executable, "-c", "import os, signal, sys; from cqd_mpi.sandboxes import uidrange; "
             "print(uidrange.UidRange(sys.argv[1]).slot, flush=True); os.kill(os.getpid(), signal.SIGKILL)", str(tree)],
            env=subprocess_env(CQD_UID_SLOTS=slots), capture_output=True, text=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        dead = int(killed.stdout)
        assert uidrange._mounted_slots() == {dead, live.slot}
        assert uidrange.sweep() == [dead]
        assert uidrange._mounted_slots() == {live.slot}
    finally:
        live.close()
    assert uidrange._mounted_slots() == set()
