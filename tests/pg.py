"""A throwaway PostgreSQL server for tests: Debian's binaries (``apt-get install postgresql``, done by
.ci/run), a fresh cluster in a temporary directory, listening on loopback only, trust authentication.

initdb and postgres refuse to run as root, so as root the server runs as the ``postgres`` user
(``runuser``); the cluster directory is created for that user and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb, or None."""
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return cands[-1].parent if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(dbname: str = "imem") -> Iterator[str]:
    """Start a cluster; yield ``postgresql+psycopg2://postgres@127.0.0.1:<port>/<dbname>``; stop and delete it."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql (apt-get install postgresql)")
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="imem-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()

    def as_pg(*cmd: str, **kw) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if root else list(cmd)
        return subprocess.run(full, check=True, capture_output=True, text=True, **kw)

    if root:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    try:
        as_pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "server.log"), "-w", "start")
        for _ in range(50):
            r = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        as_pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", dbname)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            if (data / "postmaster.pid").exists():
                as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
