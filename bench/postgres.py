"""A PostgreSQL of the benchmark's own, for Prefect: Debian's binaries, a free port, a temp folder.

Never the machine's shared server: a benchmark must not load what others use,
nor depend on its tuning. PostgreSQL refuses to run as root, so as root it runs
as the `postgres` user that Debian's package creates (`make bench-tools`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from mcp_frontend.devstack import Service


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    return int(Path(path).parent.parent.name)


class PostgresServer(Service):
    """`postgres` on 127.0.0.1:`port`, data in `home`; database `prefect`, no password."""

    def __init__(self, port: int, home: Path) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries: run `make bench-tools` (as root)")
        self.bin_dir = bin_dir
        self.port = port
        self.data = home / "data"
        self._as = _unprivileged()
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(self.data),
            "-p", str(port),
            "-k", str(home),  # its socket here, not in /var/run/postgresql
            "-c", "listen_addresses=127.0.0.1",
            "-c", "max_connections=200",
        ]  # fmt: skip
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(
            "postgres", [*self._as, *argv], env=dict(os.environ), log_path=home / "postgres.log"
        )
        self.home = home

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/prefect"

    def start_and_wait(self, timeout_s: float = 60.0) -> None:
        if self._as:
            shutil.chown(self.home, user="postgres")
            # The benchmark's temp folder is root's (mode 700): let `postgres` through it.
            self.home.parent.chmod(0o711)
        self._run(
            self.bin_dir / "initdb",
            "-D",
            str(self.data),
            "-U",
            "prefect",
            "--auth=trust",
            "-E",
            "UTF8",
        )
        self.start()
        self.wait_ready(self._ready, timeout_s)
        self._run(
            self.bin_dir / "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "prefect",
            "prefect",
        )

    def _ready(self) -> bool:
        probe = [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(probe, capture_output=True).returncode == 0

    def _run(self, *argv: str | Path) -> None:
        subprocess.run([*self._as, *map(str, argv)], check=True, capture_output=True, cwd=self.home)


def _unprivileged() -> list[str]:
    """How to run PostgreSQL's commands: as `postgres` when we are root, else as ourselves."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError: the package (and its user) is not installed
    return ["runuser", "-u", "postgres", "--"]
