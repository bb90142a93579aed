"""Test peers run as child processes: exact byte counts, a known comm, bounded in time.

    python peers.py server HOST PORT M NAME   listen, accept one, read to EOF, send M bytes, close
    python peers.py client HOST PORT N NAME   connect, send N bytes, shut down writing, read to EOF
    python peers.py churn HOST PORT COUNT NAME   COUNT short connections (send 1 byte, read 1)
    python peers.py many HOST PORT COUNT NAME    serve COUNT such connections, then exit
The server prints its port on stdout once listening ("PORT <n>"). Every socket has a timeout.
"""

import ctypes
import socket
import sys


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def read_all(s: socket.socket) -> int:
    n = 0
    while True:
        d = s.recv(65536)
        if not d:
            return n
        n += len(d)


def server(host: str, port: int, m: int) -> None:
    srv = socket.socket(family_of(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    srv.settimeout(20)
    print("PORT", srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.settimeout(20)
    read_all(conn)
    conn.sendall(b"s" * m)
    conn.close()
    srv.close()


def client(host: str, port: int, n: int) -> None:
    c = socket.create_connection((host, port), timeout=20)
    c.sendall(b"c" * n)
    c.shutdown(socket.SHUT_WR)
    got = read_all(c)
    c.close()
    print("GOT", got, flush=True)


def churn(host: str, port: int, count: int) -> None:
    for _ in range(count):
        c = socket.create_connection((host, port), timeout=20)
        c.sendall(b"x")
        c.recv(1)
        c.close()


def many(host: str, port: int, count: int) -> None:
    import threading

    srv = socket.socket(family_of(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(512)
    srv.settimeout(60)
    print("PORT", srv.getsockname()[1], flush=True)

    def handle(conn: socket.socket) -> None:
        conn.settimeout(20)
        with conn:
            if conn.recv(1):
                conn.sendall(b"y")
            read_all(conn)

    threads = []
    for _ in range(count):
        conn, _ = srv.accept()
        t = threading.Thread(target=handle, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)
    srv.close()


if __name__ == "__main__":
    mode, host, port, num, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    set_comm(name)
    {"server": server, "client": client, "churn": churn, "many": many}[mode](host, port, num)
