"""Throwaway PostgreSQL and Redis servers for benchmarks that break things.

Each server runs from a directory of its own under a temporary root, on a spare port of
127.0.0.1, so that stopping, killing or restarting it disturbs nothing else on the machine (in
particular not the shared servers on 5432 and 6379). PostgreSQL is created with ``initdb`` and
run with ``pg_ctl``; Redis is a ``redis-server`` child process without persistence, so that a
restart loses whatever was queued, as a crash of an unprotected broker would.

PostgreSQL refuses to run as root: when this process is root, its binaries run as the
``postgres`` system user, which then owns the data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class ServerError(RuntimeError):
    """A throwaway server could not be created, started or stopped."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_binary(name: str) -> str:
    """The path of a PostgreSQL server binary (``initdb``, ``pg_ctl``): on the PATH, else the
    newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        raise ServerError(f"{name} not found on the PATH nor under /usr/lib/postgresql/*/bin")

    def version(path: str) -> tuple[int, ...]:
        major = Path(path).parents[1].name
        return tuple(int(part) for part in major.split(".") if part.isdigit())

    return max(candidates, key=version)


class TempPostgres:
    """A PostgreSQL cluster in ``root``: ``start``, ``stop(mode)``, ``url(database)``. When this
    process is root, every directory above ``root`` must be open to the ``postgres`` user."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = port or free_port()
        self._user = _postgres_user()
        self._initdb = postgres_binary("initdb")
        self._pg_ctl = postgres_binary("pg_ctl")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        """Create the cluster (trust authentication on 127.0.0.1 only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.log.touch()
        if self._user is not None:
            # The temporary root is private to its creator: let the server's user through.
            self.root.chmod(0o755)
            for path in (self.data, self.log):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self._run(
            [
                self._initdb,
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            timeout_s=120,
        )

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (after crash recovery)."""
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                "-c unix_socket_directories=''",
                "-c max_connections=300",
                "-c shared_buffers=64MB",
                # The operating system keeps what the server wrote when the server is killed;
                # only a crash of the machine would need fsync, and this cluster is thrown away.
                "-c fsync=off",
                "-c full_page_writes=off",
            ]
        )
        self._run(
            [
                self._pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout_s)),
                "start",
            ],
            timeout_s=timeout_s + 10,
        )

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """``pg_ctl stop -m mode``: ``immediate`` ends every process at once, without a
        checkpoint (the next start runs crash recovery)."""
        self._run(
            [
                self._pg_ctl,
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout_s)),
                "stop",
            ],
            timeout_s=timeout_s + 10,
        )

    def running(self) -> bool:
        try:
            self._run([self._pg_ctl, "-D", str(self.data), "status"], timeout_s=30)
        except ServerError:
            return False
        return True

    def close(self) -> None:
        """Stop the server if it runs (immediately: its data is thrown away)."""
        if self.data.exists() and self.running():
            with contextlib.suppress(ServerError):
                self.stop("immediate")

    def _run(self, argv: list[str], timeout_s: float) -> None:
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                user=self._user.pw_uid if self._user else None,
                group=self._user.pw_gid if self._user else None,
                cwd=self.root,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{Path(argv[0]).name} did not finish in {timeout_s:.0f} s") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise ServerError(f"{Path(argv[0]).name} failed: {detail[-1] if detail else '?'}")


def _postgres_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: ``postgres`` when this process is root, else this one."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root, and there is no 'postgres' user to run PostgreSQL as"
        ) from None


class TempRedis:
    """A ``redis-server`` child process without persistence: ``start``, ``kill``, ``url(db)``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.log = root / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server not found on the PATH")
        self._binary = binary

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                "--logfile",
                str(self.log),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise ServerError(f"redis-server exited with status {self._proc.returncode}")
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise ServerError(
                            f"redis-server not ready after {timeout_s:.0f} s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server and everything it held are gone at once."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        self.kill()
