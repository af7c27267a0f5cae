"""The minimal Linux NAT VM of bench/vm_vs_state.py, built from Debian packages only.

A Debian kernel (the package linux-image-amd64 depends on) and an initramfs holding
busybox (busybox-static), conntrack and nft (conntrack, nftables) with the shared libraries
they link, the kernel modules a NAT needs (conntrack, NAT, nftables, ctnetlink, virtio-net,
each with its dependencies, inserted in dependency order) and an /init that configures the
two NICs, the SNAT policy, loads the sessions it is given, says so on the serial console and
stays up. Nothing else runs in the guest.

The packages are fetched with `apt-get download`, unpacked with `dpkg-deb -x`, and the
result is cached under ``cache/<key>/`` (kernel, initramfs, manifest), the key a hash of the
packages' versions and of this file's /init: a second run builds nothing. The sessions of
one run go in a second, small initramfs (``sessions_initrd``) that the kernel unpacks over
the first (concatenated cpio archives), as files of `conntrack -R` commands.

    .venv/bin/python bench/vm_image.py [--cache DIR]      # build (or find) the image
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nfmig.nf_backends.base import Session

DEFAULT_CACHE = Path.home() / ".cache" / "nfmig" / "vm"
USERLAND = ("busybox-static", "conntrack", "nftables")
KERNEL_META = "linux-image-amd64"
# What a NAT needs; each module's own dependencies come from its modinfo. Ones the kernel
# has built in are simply not found as files and skipped. crc32c_generic: libcrc32c's soft
# dependency (it asks the crypto API for "crc32c" when it loads), which modinfo's depends=
# does not name.
MODULES = ("crc32c_generic", "virtio_pci", "virtio_net", "nf_conntrack", "nf_nat", "nfnetlink",
           "nf_tables", "nft_chain_nat", "nft_nat", "nft_masq", "nft_ct", "nf_conntrack_netlink")
# The guest's NICs, told apart by MAC: the same on the source and the destination QEMU.
INSIDE_MAC, OUTSIDE_MAC = "52:54:00:00:0a:01", "52:54:00:00:c0:01"
INSIDE_ADDRESS, OUTSIDE_ADDRESS = "10.0.0.1/24", "192.0.2.1/24"
READY = "NFMIG-READY"
CHUNK = 5000  # sessions per `conntrack -R` in the guest

# PID 1 of the guest (busybox sh). The policy is the test bed's: source NAT of the inside
# prefix out of the outside interface, strict TCP tracking as on the NAT namespaces.
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin LD_LIBRARY_PATH=/lib
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko; done
nic() {{ for d in /sys/class/net/*; do
  [ "$(cat $d/address)" = "$1" ] && basename $d; done; }}
IN=$(nic {INSIDE_MAC}); OUT=$(nic {OUTSIDE_MAC})
ip link set lo up; ip link set $IN up; ip link set $OUT up
ip addr add {INSIDE_ADDRESS} dev $IN; ip addr add {OUTSIDE_ADDRESS} dev $OUT
for s in net.ipv4.ip_forward=1 net.netfilter.nf_conntrack_acct=1 \\
         net.netfilter.nf_conntrack_tcp_loose=0 net.netfilter.nf_conntrack_tcp_be_liberal=0 \\
         net.netfilter.nf_conntrack_max=$(cat /ct_max) \\
         net.netfilter.nf_conntrack_buckets=$(cat /ct_buckets); do sysctl -q -w $s; done
nft -f - <<EOF
table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    oifname "$OUT" ip saddr 10.0.0.0/24 snat to 192.0.2.1
  }}
}}
EOF
for f in /sessions/*.ct; do [ -s $f ] && conntrack -R $f 2>/dev/null; rm -f $f; done
echo "{READY} $(conntrack -C)" > /dev/ttyS0
while :; do sleep 3600; done
"""


@dataclass
class Image:
    kernel: Path
    initrd: Path
    key: str
    packages: dict[str, str]  # name -> version

    @property
    def kernel_version(self) -> str:
        return self.packages.get("kernel", "?")


def build(cache: Path = DEFAULT_CACHE, log=print) -> Image:
    """The image for the packages APT offers now: from the cache, or built into it."""
    packages = _resolve()
    key = hashlib.sha256(json.dumps([sorted(packages.items()), INIT, MODULES]).encode()
                         ).hexdigest()[:16]
    where = cache / key
    manifest = where / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return Image(where / "vmlinuz", where / "initrd.gz", key, data["packages"])
    log(f"building the NAT VM image from Debian packages into {where} ...")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nfmig-vmimg-", dir=cache) as tmp:
        work = Path(tmp)
        debs, root = work / "debs", work / "root"
        debs.mkdir()
        # _apt cannot write into a root-only directory; apt-get warns and downloads as root
        _run(["apt-get", "download", "-q", *(f"{p}={v}" for p, v in packages.items()
                                              if p != "kernel")], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernel_release = packages["kernel"]
        staging = work / "initrd"
        _stage(root, staging, kernel_release)
        out = work / "out"
        out.mkdir()
        shutil.copy(root / "boot" / f"vmlinuz-{kernel_release}", out / "vmlinuz")
        (out / "initrd.gz").write_bytes(gzip.compress(cpio_newc(staging), 6))
        (out / "manifest.json").write_text(json.dumps({"packages": packages}, indent=1))
        out.rename(where)
    log(f"built {where}")
    return Image(where / "vmlinuz", where / "initrd.gz", key, packages)


def _resolve() -> dict[str, str]:
    """The packages (with the versions APT would take) the image is made of: the kernel
    the meta-package depends on, the userland, and every library these depend on."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", KERNEL_META])
    kernel = re.search(r"Depends: (linux-image-[\d.]+-\d+-amd64)", out)
    if not kernel:
        raise RuntimeError(f"cannot tell which kernel {KERNEL_META} depends on:\n{out}")
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                *USERLAND])
    names = {line.strip() for line in out.splitlines() if not line.startswith(" ")}
    names = {n for n in names if n in USERLAND or n.startswith("lib")} | {kernel.group(1)}
    versions = {}
    for name in sorted(names):
        found = re.search(r"Candidate: (\S+)", _run(["apt-cache", "policy", name]))
        if not found or found.group(1) == "(none)":
            raise RuntimeError(f"APT offers no {name} (apt-get update?)")
        versions[name] = found.group(1)
    versions["kernel"] = kernel.group(1).removeprefix("linux-image-")
    return versions


def _stage(root: Path, staging: Path, release: str) -> None:
    """The initramfs tree: busybox, conntrack, nft, their libraries, the modules."""
    for d in ("bin", "sbin", "usr/sbin", "lib", "lib64", "proc", "sys", "dev", "modules",
              "etc"):
        (staging / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "bin" / "busybox", staging / "bin" / "busybox")
    binaries = [root / "usr" / "sbin" / "conntrack", root / "usr" / "sbin" / "nft"]
    for binary in binaries:
        shutil.copy(binary, staging / "usr" / "sbin" / binary.name)
    for name, lib in _libraries(root, binaries).items():
        shutil.copy(lib, staging / "lib" / name)  # the content, under the name asked for
    loader = staging / "lib" / "ld-linux-x86-64.so.2"
    shutil.copy(root / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2", loader)
    (staging / "lib64" / "ld-linux-x86-64.so.2").symlink_to("/lib/ld-linux-x86-64.so.2")
    order = _module_order(root / "lib" / "modules" / release)
    for name, path in order:
        shutil.copy(path, staging / "modules" / f"{name}.ko")
    (staging / "modules.order").write_text("\n".join(name for name, _ in order) + "\n")
    (staging / "init").write_text(INIT)
    (staging / "init").chmod(0o755)
    (staging / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    # the run's values (the sessions' initramfs overwrites them)
    (staging / "ct_max").write_text("65536\n")
    (staging / "ct_buckets").write_text("16384\n")


def _libraries(root: Path, binaries: list[Path]) -> dict[str, Path]:
    """The unpacked shared libraries the binaries need, by the name they ask for (ldd,
    looking in the unpacked tree first)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(
        str(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")))
    found: dict[str, Path] = {}
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env,
                             check=True, timeout=30).stdout
        for name, path in re.findall(r"^\s*(\S+) => (\S+)", out, re.M):
            if not path.startswith(str(root)):
                raise RuntimeError(f"{binary.name} needs {name}, not in the unpacked "
                                   "packages")
            found[name] = Path(path)
    return found


_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def _module_order(moddir: Path) -> list[tuple[str, Path]]:
    """MODULES and their dependencies (modinfo's depends=), dependencies first."""
    files = {p.name.removesuffix(".ko").replace("-", "_"): p
             for p in moddir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name not in files:  # built in, or already placed
            return
        seen.add(name)
        found = _DEPENDS.search(files[name].read_bytes())
        for dep in (found.group(1).decode().split(",") if found else []):
            if dep:
                visit(dep)
        order.append((name, files[name]))

    for module in MODULES:
        visit(module)
    return order


def cpio_newc(tree: Path) -> bytes:
    """The tree as a cpio archive ("newc", what the kernel unpacks), owned by root."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        namez = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for path in sorted(tree.rglob("*")):
        name = str(path.relative_to(tree))
        if path.is_symlink():
            entry(name, 0o120777, os.readlink(path).encode())
        elif path.is_dir():
            entry(name, 0o040755, b"")
        else:
            entry(name, 0o100000 | (path.stat().st_mode & 0o777), path.read_bytes())
    entry("TRAILER!!!", 0, b"")
    return bytes(out)


def sessions_initrd(sessions: list[Session], out: Path) -> Path:
    """The run's sessions as `conntrack -R` commands in a small initramfs of their own,
    with the conntrack table sized for them."""
    lines = [f"-I -p tcp -s {s.src_address} -d {s.dst_address} --sport {s.src_port} "
             f"--dport {s.dst_port} -r {s.dst_address} -q {s.translated_address} "
             f"--reply-port-src {s.dst_port} --reply-port-dst {s.translated_port} "
             f"--state ESTABLISHED -u SEEN_REPLY,ASSURED -t {s.timeout}\n"
             for s in sessions]
    with tempfile.TemporaryDirectory(prefix="nfmig-vmsess-") as tmp:
        tree = Path(tmp)
        # conntrack -R reads its whole file before it inserts (150 MB for 100k lines):
        # files of CHUNK lines keep it small in a small guest
        (tree / "sessions").mkdir()
        for i in range(0, len(lines), CHUNK):
            (tree / "sessions" / f"{i // CHUNK:06d}.ct").write_text("".join(lines[i:i + CHUNK]))
        (tree / "ct_max").write_text(f"{max(65536, 2 * len(sessions))}\n")
        (tree / "ct_buckets").write_text(f"{max(16384, len(sessions) // 2)}\n")
        out.write_bytes(gzip.compress(cpio_newc(tree), 6))
    return out


def _run(argv: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({done.returncode}):\n"
                           f"{done.stderr.strip()[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    image = build(args.cache)
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd),
                      "key": image.key, "packages": image.packages}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
