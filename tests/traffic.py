"""A user's connection for migration tests, run inside a test namespace.

Each side opens the connection, exchanges a greeting (so the NAT holds an established
session), says "ready" on stdout and waits for "go" on stdin; then the side told to speak
first sends, the other answers, and both print "done". Any failure prints "error ..." and
exits 1.

    traffic.py tcp-server PORT SIZE          traffic.py tcp-client HOST PORT SIZE [SOURCE]
    traffic.py udp-server PORT FIRST         traffic.py udp-client HOST PORT FIRST [SOURCE]
    traffic.py tcp-many-server PORT N        traffic.py tcp-many-client HOST PORT N ADDR,...
"""

from __future__ import annotations

import resource
import socket
import sys

TIMEOUT = 20


def say(*words: object) -> None:
    print(*words, flush=True)


def wait_go() -> None:
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("expected go")


def recv_exactly(conn: socket.socket, size: int) -> None:
    left = size
    while left:
        data = conn.recv(min(left, 1 << 16))
        if not data:
            raise RuntimeError(f"connection closed with {left} bytes still expected")
        left -= len(data)


def tcp_server(port: int, size: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as listener:
        listener.settimeout(TIMEOUT)
        say("listening")
        conn, peer = listener.accept()
        conn.settimeout(TIMEOUT)
        recv_exactly(conn, 2)
        conn.sendall(b"ok")
        say("ready", peer[0], peer[1])
        wait_go()
        conn.sendall(b"s" * size)  # the server speaks first after the switch
        recv_exactly(conn, size)
        say("done", peer[0], peer[1])


def tcp_client(host: str, port: int, size: int, source: str = "") -> None:
    conn = socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0))
    conn.sendall(b"hi")
    recv_exactly(conn, 2)
    say("ready", *conn.getsockname())
    wait_go()
    recv_exactly(conn, size)
    conn.sendall(b"c" * size)
    say("done")


def udp_server(port: int, first: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.bind(("0.0.0.0", port))
    say("listening")
    data, peer = sock.recvfrom(100)
    sock.sendto(b"ok", peer)
    say("ready", peer[0], peer[1])
    wait_go()
    if first == "server":
        sock.sendto(b"after", peer)
    data, seen = sock.recvfrom(100)
    if seen != peer:
        raise RuntimeError(f"datagram came from {seen}, not {peer}")
    if first == "client":
        sock.sendto(b"after", peer)
    say("done", seen[0], seen[1])


def udp_client(host: str, port: int, first: str, source: str = "") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))  # "" lets routing choose, as an unbound socket would
    sock.connect((host, port))
    sock.send(b"hi")
    sock.recv(100)
    say("ready", *sock.getsockname())
    wait_go()
    if first == "client":
        sock.send(b"after")
        sock.recv(100)
    else:
        sock.recv(100)
        sock.send(b"after")
    say("done")


def _more_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))


def tcp_many_server(port: int, count: int) -> None:
    """``count`` connections; after go, 1000 bytes out on each, then 1000 back on each."""
    _more_files(count)
    with socket.create_server(("0.0.0.0", port), backlog=count) as listener:
        listener.settimeout(TIMEOUT)
        say("listening")
        conns = []
        for _ in range(count):
            conn, peer = listener.accept()
            conn.settimeout(TIMEOUT)
            recv_exactly(conn, 2)
            conn.sendall(b"ok")
            conns.append(conn)
        say("ready", len({c.getpeername() for c in conns}))
        wait_go()
        for conn in conns:
            conn.sendall(b"s" * 1000)
        for conn in conns:
            recv_exactly(conn, 1000)
        say("done", len(conns))


def tcp_many_client(host: str, port: int, count: int, sources: list[str]) -> None:
    _more_files(count)
    conns = []
    for i in range(count):
        conn = socket.create_connection((host, port), timeout=TIMEOUT,
                                        source_address=(sources[i % len(sources)], 0))
        conn.sendall(b"hi")
        recv_exactly(conn, 2)
        conns.append(conn)
    say("ready", len(conns))
    wait_go()
    for conn in conns:
        recv_exactly(conn, 1000)
        conn.sendall(b"c" * 1000)
    say("done", len(conns))


def main(argv: list[str]) -> int:
    mode, *args = argv
    try:
        if mode == "tcp-server":
            tcp_server(int(args[0]), int(args[1]))
        elif mode == "tcp-client":
            tcp_client(args[0], int(args[1]), int(args[2]), *args[3:4])
        elif mode == "udp-server":
            udp_server(int(args[0]), args[1])
        elif mode == "udp-client":
            udp_client(args[0], int(args[1]), args[2], *args[3:4])
        elif mode == "tcp-many-server":
            tcp_many_server(int(args[0]), int(args[1]))
        elif mode == "tcp-many-client":
            tcp_many_client(args[0], int(args[1]), int(args[2]), args[3].split(","))
        else:
            raise RuntimeError(f"unknown mode {mode}")
    except Exception as exc:  # reported to the test through stdout
        say("error", repr(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
