"""The nfmig command: serve an NF instance, manage its users, run the demo, migrate."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from nfmig import __version__, evacuate_cli, migrate_cli, standby_cli
from nfmig.server import login_policy, ssh_limits


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    if not number.isdigit() or int(number) < 1024 // scale:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least 1024 bytes "
                                         "(e.g. 65536, 64k, 256m)")
    return int(number) * scale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfmig",
        description="Move the live state of network functions between different "
                    "implementations through a common YANG model.")
    parser.add_argument("--version", action="version", version=f"nfmig {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the NETCONF server of one NF instance",
                           description="Serve one NAT instance's state over NETCONF (SSH). "
                           "The datastore is the YANG model nfmig-nat, backed by the NAT's "
                           "own session table.")
    serve.add_argument("--backend", choices=("simulated", "linux", "openflow"),
                       default="simulated",
                       help="NAT implementation behind the datastore (default: simulated)")
    serve.add_argument("--nf", choices=("nat", "firewall"), default="nat",
                       help="the network function served: a NAT (nfmig-nat) or a stateful "
                            "firewall (nfmig-firewall beside nfmig-nat; default: nat)")
    serve.add_argument("--netns", metavar="NAME",
                       help="network namespace of the NAT instance (linux and openflow "
                            "backends; a name under /run/netns or a path)")
    serve.add_argument("--sessions", type=_count, default=0, metavar="N",
                       help="seed N sessions at start (simulated backend)")
    serve.add_argument("--traffic", type=float, default=0.0, metavar="RATE",
                       help="synthetic new sessions per second (simulated backend; default 0)")
    serve.add_argument("--netconf-port", type=_port, default=830, metavar="PORT",
                       help="NETCONF over SSH port (default 830; 0 picks a free port)")
    serve.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                       help="address to listen on (default 127.0.0.1, loopback only)")
    serve.add_argument("--users", type=Path, required=True, metavar="FILE",
                       help="users file written by 'nfmig adduser'")
    serve.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                       help="where the host key and the startup datastore live")
    serve.add_argument("--max-message-size", type=_size, default=256 << 20, metavar="BYTES",
                       help="largest request accepted, e.g. 64m (default 256m)")
    serve.add_argument("--port-file", type=Path, metavar="FILE",
                       help="write the NETCONF port here once listening (useful with port 0)")
    serve.add_argument("--restconf-port", type=_port, metavar="PORT",
                       help="also serve RESTCONF (HTTPS, HTTP Basic against --users) on PORT "
                            "(0 picks a free port)")
    serve.add_argument("--restconf-port-file", type=Path, metavar="FILE",
                       help="write the RESTCONF port here once listening")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="RESTCONF certificate chain (default: a self-signed one created "
                            "in --state-dir on first start)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM",
                       help="private key of --tls-cert")
    serve.add_argument("--restconf-plain-http", action="store_true",
                       help="RESTCONF over plain HTTP instead of HTTPS; only with a loopback "
                            "--listen address")
    serve.add_argument("--nacm-recovery-user", metavar="NAME",
                       help="a user of --users whose sessions from this host (a loopback "
                            "address) bypass NACM access control, to repair a lock-out "
                            "(default: none)")
    login_policy.add_login_options(serve)
    ssh_limits.add_ssh_options(serve)

    adduser = sub.add_parser("adduser", help="add a user to a users file",
                             description="Add a password (stored scrypt-hashed) or an SSH "
                             "public key for NAME to FILE (created with mode 0600), and NACM "
                             "groups. A user with no group at all is in group admin (full "
                             "access); the server ships groups operator (read-only) and "
                             "migrator (what nfmig migrate needs).")
    adduser.add_argument("--users", type=Path, required=True, metavar="FILE")
    adduser.add_argument("name", metavar="NAME")
    how = adduser.add_mutually_exclusive_group()
    how.add_argument("--password", metavar="PW",
                     help="the password; '-' reads it from standard input or a prompt")
    how.add_argument("--key", type=Path, metavar="PUBKEYFILE", help="an OpenSSH public key file")
    adduser.add_argument("--group", action="append", default=[], metavar="GROUP",
                         help="an NACM group of the user (repeatable; alone, adds groups to "
                              "an existing user)")
    adduser.add_argument("--scrypt-cost", type=int, metavar="LOG2N",
                         help="scrypt work factor N = 2^LOG2N (default 17: 128 MiB and a few "
                              "hundred ms per login). Lower only for a random machine-made "
                              "secret, e.g. in tests; a password a person chose needs 17")

    demo = sub.add_parser("demo", help="move all sessions between two NF instances",
                          description="As root: a Linux kernel NAT (A) and an SDN NAT on Open "
                          "vSwitch (B) in network namespaces built for the demo; a live TCP "
                          "stream runs through A, its session moves to B (get-data on A, "
                          "edit-config on B, gateway switch, delete on A) and the stream keeps "
                          "flowing. With --nf firewall, the same between a Linux stateful "
                          "firewall and an OpenFlow one. Otherwise: two simulated instances "
                          "on loopback, and every session moves from A to B.")
    demo.add_argument("--nf", choices=("nat", "firewall"), default="nat",
                      help="the network function to move (default: nat)")
    demo.add_argument("--sessions", type=_count, default=1000, metavar="N",
                      help="sessions on simulated instance A at the start (default 1000)")
    migrate_cli.add_parsers(sub)
    standby_cli.add_parsers(sub)
    evacuate_cli.add_parsers(sub)
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    from nfmig.nf_backends import BackendError, create_backend
    from nfmig.server.app import Server, ServerConfig
    from nfmig.server.auth import UsersFileError

    config = ServerConfig(state_dir=args.state_dir, users_file=args.users, listen=args.listen,
                          netconf_port=args.netconf_port,
                          max_message_size=args.max_message_size,
                          restconf_port=args.restconf_port, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, restconf_plain_http=args.restconf_plain_http,
                          nacm_recovery_user=args.nacm_recovery_user)
    config.login = login_policy.policy_from_args(args)
    config.ssh = ssh_limits.limits_from_args(args)
    problem = _restconf_problem(args)
    if problem:
        return _fail(problem)
    try:
        backend = create_backend(args.backend, sessions=args.sessions, traffic=args.traffic,
                                 netns=args.netns, nf=args.nf)
    except ValueError as exc:
        return _fail(str(exc))
    if args.backend in ("linux", "openflow") and not Path(backend.netns_path).exists():
        return _fail(f"network namespace {args.netns} does not exist")
    try:
        server = Server(config, backend)
        server.start()
    except BackendError as exc:
        return _fail(f"the {args.backend} {args.nf} cannot start: {exc}")
    except UsersFileError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen on {args.listen} port {args.netconf_port}: "
                     f"{exc.strerror or exc}")
    except RuntimeError as exc:
        return _fail(str(exc))
    if args.port_file:
        args.port_file.write_text(f"{server.listener.port}\n")
    if args.restconf_port_file and server.restconf:
        args.restconf_port_file.write_text(f"{server.restconf.port}\n")
    logging.getLogger("nfmig").info("serving %s %s with %d sessions", args.backend,
                                    "firewall" if args.nf == "firewall" else "NAT",
                                    backend.stats().session_count)
    server.run_forever()
    return 0


def _restconf_problem(args: argparse.Namespace) -> str | None:
    import ipaddress

    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together"
    if args.restconf_port is None:
        if args.tls_cert or args.restconf_plain_http or args.restconf_port_file:
            return ("--tls-cert, --tls-key, --restconf-plain-http and --restconf-port-file "
                    "need --restconf-port")
        return None
    if args.restconf_plain_http:
        if args.tls_cert:
            return "--restconf-plain-http and --tls-cert exclude each other"
        try:
            loopback = ipaddress.ip_address(args.listen).is_loopback
        except ValueError:
            loopback = args.listen == "localhost"
        if not loopback:
            return (f"--restconf-plain-http is allowed only on a loopback --listen address, "
                    f"not {args.listen}; use HTTPS there")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            return f"{path} does not exist"
    return None


def _cmd_adduser(args: argparse.Namespace) -> int:
    from nfmig.server.auth import UsersFileError, add_user

    if args.password is None and args.key is None and not args.group:
        return _fail("give --password, --key or --group")
    password = args.password
    if password == "-":
        password = (getpass.getpass(f"password for {args.name}: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\n"))
    try:
        add_user(args.users, args.name, password=password, pubkey_file=args.key,
                 log2_n=args.scrypt_cost, groups=args.group)
    except (UsersFileError, OSError) as exc:
        return _fail(str(exc))
    print(f"added {args.name} to {args.users}"
          + (f" in group {', '.join(args.group)}" if args.group else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.nf == "firewall":
        from nfmig.client.demo_firewall import run_firewall_demo

        return run_firewall_demo(args.sessions)
    from nfmig.client.demo import run_demo

    return run_demo(args.sessions)


def _fail(message: str) -> int:
    print(f"nfmig: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("paramiko", "ncclient", "sshutil", "netconf"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    handlers = {"serve": _cmd_serve, "adduser": _cmd_adduser, "demo": _cmd_demo,
                "migrate": migrate_cli.cmd_migrate, "report": migrate_cli.cmd_report,
                "standby": standby_cli.cmd_standby, "failover": standby_cli.cmd_failover,
                "evacuate": evacuate_cli.cmd_evacuate}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of the output went away (| head): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

