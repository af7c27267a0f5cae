"""The server's files are private: the state directory 0700 and every file in it 0600 (host
keys, TLS key and certificate, startup.xml, the pending-commit record), the users file
0600; files an earlier version left readable are tightened when the server starts, and
that is logged. Password hashes follow current guidance and older ones keep verifying.

Real `nfmig serve` processes and real clients (ncclient, aiohttp).
"""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
import time
from pathlib import Path

from lxml import etree
from ncclient import manager
from nfmig.server.auth import hash_params, verify_password

from .restconf_client import Restconf, start_with_restconf

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes(state_dir: Path) -> dict[str, int]:
    """The mode of the directory ('.') and of everything in it."""
    return {".": mode(state_dir),
            **{str(p.relative_to(state_dir)): mode(p) for p in state_dir.rglob("*")}}


def connect(server) -> manager.Manager:
    return manager.connect(host="127.0.0.1", port=server.port, username=server.user,
                           password=server.password, hostkey_verify=False, allow_agent=False,
                           look_for_keys=False, timeout=60)


def test_every_file_the_server_writes_is_private(tmp_path):
    server, port = start_with_restconf(tmp_path)
    try:
        assert Restconf(server, port).get("/restconf").status == 200
        with connect(server) as m:
            m.copy_config(source="running", target="startup")  # writes startup.xml
            m.dispatch(etree.fromstring(  # a pending confirmed commit keeps a record
                f'<commit xmlns="{NC_NS}"><confirmed/><confirm-timeout>60</confirm-timeout>'
                "<persist>state-files</persist></commit>"))
            found = modes(server.state_dir)
            m.dispatch(etree.fromstring(f'<cancel-commit xmlns="{NC_NS}">'
                                        "<persist-id>state-files</persist-id></cancel-commit>"))
    finally:
        server.stop()
    for name in ("startup.xml", "pending-commit.json", "restconf-cert.pem",
                 "restconf-key.pem", "ssh_host_ecdsa_key"):
        assert name in found, found
    assert found.pop(".") == 0o700
    assert all(m == 0o600 for m in found.values()), {k: oct(v) for k, v in found.items()}
    assert mode(tmp_path / "users") == 0o600


def test_files_left_readable_by_an_earlier_version_are_tightened_on_start(tmp_path):
    server, port = start_with_restconf(tmp_path)
    try:
        with connect(server) as m:
            m.copy_config(source="running", target="startup")
    finally:
        server.stop()
    state = server.state_dir
    # What an earlier version left behind: a world-readable directory and files.
    state.chmod(0o755)
    for path in state.iterdir():
        path.chmod(0o644)
    (tmp_path / "users").chmod(0o644)
    stale = sorted(p.name for p in state.iterdir())
    server, port = start_with_restconf(tmp_path, password=server.password)
    try:
        assert Restconf(server, port).get("/restconf").status == 200  # still serves
        found = modes(state)
        log = server.log.read_text()
    finally:
        server.stop()
    assert found.pop(".") == 0o700
    assert all(m == 0o600 for m in found.values()), {k: oct(v) for k, v in found.items()}
    assert mode(tmp_path / "users") == 0o600
    for name in stale:  # each one tightened is logged
        assert f"{state / name} was open to other users (mode 0644); now 0600" in log
    assert f"{state} was open to other users (mode 0755); now 0700" in log


def test_a_shared_directory_is_refused_as_state_directory(tmp_path):
    """Making /tmp 0700 would break everyone else: a world-writable or sticky directory is
    refused instead, and left as it was."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users",
                    str(tmp_path / "users"), "op", "--password=x", "--scrypt-cost=10"],
                   check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "nfmig", "serve", "--users",
                           str(tmp_path / "users"), "--state-dir", str(shared),
                           "--netconf-port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "shared" in done.stderr, done.stderr
    assert mode(shared) == 0o1777 and not any(shared.iterdir())


def test_passwords_are_hashed_at_current_guidance_and_old_hashes_still_verify(tmp_path):
    users = tmp_path / "users"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nfmig", "adduser", "--users", str(users), "op",
                    "--password=s3cret pass"], check=True, capture_output=True)
    took = time.perf_counter() - started
    stored = users.read_text().split()[2]
    params = hash_params(stored)
    assert params is not None and params.n >= 2**17 and (params.r, params.p) == (8, 1)
    assert verify_password("s3cret pass", stored) and not verify_password("s3cret", stored)
    print(f"adduser with scrypt N=2^17: {took:.2f} s (interpreter start included)")
    # A hash an earlier version wrote (N=2^14, r=8, p=1), made here the way it made them;
    # every server the tests start logs its admin in with such a cheap hash too.
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"old password", salt=salt, n=2**14, r=8, p=1, dklen=32)
    old = "$".join(["scrypt", "16384", "8", "1", base64.b64encode(salt).decode(),
                    base64.b64encode(digest).decode()])
    assert verify_password("old password", old) and not verify_password("old passwore", old)
