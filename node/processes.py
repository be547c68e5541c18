"""Child processes that a command starts and must stop: devnet nodes, anvil, the demo.

Every child runs in its own process group and is recorded in a state file, so
`longtail devnet down` (or Ctrl-C, or a crash of the parent) stops exactly what
was started, and a second `up` finds nothing stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class ProcessError(RuntimeError):
    """A child failed to start or to become ready in time."""


@dataclasses.dataclass(frozen=True)
class ChildRecord:
    name: str
    pid: int
    log: str
    url: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ProcessError(f"process {process.args[0]} exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise ProcessError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class ProcessGroup:
    """Starts named children, remembers them in `state_file`, and stops them all."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.children: dict[str, subprocess.Popen] = {}
        self.records: dict[str, ChildRecord] = {}

    def start(self, name: str, argv: list[str], log_file: Path, env: dict[str, str] | None = None,
              url: str | None = None) -> subprocess.Popen:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handle = log_file.open("ab")
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        handle.close()
        self.children[name] = process
        self.records[name] = ChildRecord(name=name, pid=process.pid, log=str(log_file), url=url)
        self._save()
        return process

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps([dataclasses.asdict(r) for r in self.records.values()], indent=2))

    def stop(self, name: str, timeout: float = 10.0) -> None:
        process = self.children.pop(name, None)
        record = self.records.pop(name, None)
        if process is not None:
            _terminate_group(process.pid, timeout, process)
        elif record is not None:
            _terminate_group(record.pid, timeout, None)
        self._save()

    def stop_all(self, timeout: float = 10.0) -> None:
        # Reverse start order: nodes before the chain they talk to.
        for name in reversed(list(self.records)):
            self.stop(name, timeout)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    @classmethod
    def from_state(cls, state_file: Path) -> ProcessGroup:
        """Adopt the children a previous command recorded, to report on or stop them."""
        group = cls(state_file)
        if state_file.exists():
            for row in json.loads(state_file.read_text()):
                group.records[row["name"]] = ChildRecord(**row)
        return group

    def alive(self) -> dict[str, bool]:
        return {name: _pid_alive(record.pid) for name, record in self.records.items()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_group(pid: int, timeout: float, process: subprocess.Popen | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not _pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=2)
