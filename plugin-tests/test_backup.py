"""cln-backup against a real lightningd and bitcoind, with pyln-testing.

Skipped when lightningd is not on PATH (its binaries are not on the package registries).
Run: cargo build --release && pip install pyln-testing && pytest plugin-tests/test_backup.py
"""
import os
import shutil
import sqlite3
import subprocess

import pytest

if shutil.which("lightningd") is None:
    pytest.skip("lightningd is not on PATH", allow_module_level=True)
pytest.importorskip("pyln.testing")

from pyln.testing.fixtures import *  # noqa: F401,F403,E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "target", "release", "cln-backup")
CLI = os.path.join(ROOT, "target", "release", "backup-cli")
if not os.path.exists(PLUGIN):
    pytest.skip("build first: cargo build --release", allow_module_level=True)


def paths(directory):
    bpath = os.path.join(directory, "lightning-1", "regtest")
    bdest = "file://" + os.path.join(directory, "node.bkp")
    return bpath, bdest


def opts():
    return {"important-plugin": PLUGIN}


def init_backup(directory):
    bpath, bdest = paths(directory)
    os.makedirs(bpath, exist_ok=True)
    subprocess.check_call([CLI, "init", "--lightning-dir", bpath, bdest])
    return bpath, bdest


def test_start_and_restart(node_factory, directory):
    init_backup(directory)
    l1 = node_factory.get_node(options=opts(), cleandir=False)
    names = [os.path.basename(p["name"]) for p in l1.rpc.plugin("list")["plugins"]]
    assert "cln-backup" in names
    for _ in range(5):
        l1.restart()
        assert l1.daemon.is_in_log(r"plugin-cln-backup: Versions match up")
    st = l1.rpc.call("backup-status")
    assert st["state"] == "ok" and st["hooks"]["count"] > 0


def test_start_no_init(node_factory, directory):
    bpath, _ = paths(directory)
    os.makedirs(bpath)
    l1 = node_factory.get_node(options=opts(), cleandir=False, may_fail=True, start=False)
    with pytest.raises((ValueError, Exception)):
        l1.start()
    assert l1.daemon.is_in_log(r"Could not find backup.lock in the lightning-dir")


def test_init_not_empty(node_factory, directory):
    bpath, bdest = paths(directory)
    l1 = node_factory.get_node()
    l1.stop()
    out = subprocess.check_output([CLI, "init", "--lightning-dir", bpath, bdest])
    assert b"Found an existing database" in out
    assert b"Successfully written initial snapshot" in out
    l1.daemon.opts.update(opts())
    l1.start()
    assert l1.daemon.is_in_log(r"plugin-cln-backup: Versions match up")


def test_tx_abort(node_factory, directory):
    """A crash between hook and commit: the node is one version behind the backup."""
    init_backup(directory)
    l1 = node_factory.get_node(options=opts(), cleandir=False)
    l1.stop()
    l1.db.execute("UPDATE vars SET intval = intval - 1 WHERE name = 'data_version'")
    l1.start()
    assert l1.daemon.is_in_log(r"Last changes not applied")


def test_lost_state(node_factory, directory):
    init_backup(directory)
    l1 = node_factory.get_node(options=opts(), cleandir=False, may_fail=True)
    l1.stop()
    l1.db.execute("UPDATE vars SET intval = intval - 2 WHERE name = 'data_version'")
    with pytest.raises(Exception):
        l1.start()
    l1.daemon.proc.wait()
    assert l1.daemon.is_in_log(r"lost some state")


def test_intermittent_backup(node_factory, directory):
    init_backup(directory)
    l1 = node_factory.get_node(options=opts(), cleandir=False, may_fail=True)
    del l1.daemon.opts["important-plugin"]
    l1.restart()
    l1.stop()
    with pytest.raises(Exception):
        l1.daemon.opts.update(opts())
        l1.start()
    l1.daemon.proc.wait()
    assert l1.daemon.is_in_log(r"Backup is out of date")


def test_restore_to_file_and_dir(node_factory, directory):
    bpath, bdest = init_backup(directory)
    l1 = node_factory.get_node(options=opts(), cleandir=False)
    l1.rpc.newaddr()
    l1.stop()
    rdest = os.path.join(directory, "restored.sqlite3")
    subprocess.check_call([CLI, "restore", bdest, rdest])
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.check_call([CLI, "restore", bdest, bpath])
    live = sqlite3.connect(os.path.join(bpath, "lightningd.sqlite3"))
    want = live.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()
    os.remove(os.path.join(bpath, "lightningd.sqlite3"))
    subprocess.check_call([CLI, "restore", bdest, bpath])
    got = sqlite3.connect(os.path.join(bpath, "lightningd.sqlite3"))
    assert got.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone() == want
    l1.start()
