"""A local anvil chain from the pinned npm package, on a free loopback port.

Used by the contract tests, the node tests and the demo: `with Anvil() as chain: chain.w3 ...`.
The dev accounts are anvil's well-known ones (mnemonic "test test ... junk"), funded with ETH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_RELATIVE = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
DEFAULT_CHAIN_ID = 31337

# anvil's default accounts 0..9 (derived from "test test test test test test test test test test test junk").
DEV_PRIVATE_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
DEV_ACCOUNTS: tuple[LocalAccount, ...] = tuple(Account.from_key(key) for key in DEV_PRIVATE_KEYS)


class AnvilError(RuntimeError):
    """anvil is missing, did not start, or died."""


def anvil_binary() -> Path:
    """The anvil executable: $LONGTAIL_ANVIL, the repo's pinned npm package, or one on PATH."""
    override = os.environ.get("LONGTAIL_ANVIL")
    if override:
        return Path(override)
    pinned = REPO_ROOT / ANVIL_RELATIVE
    if pinned.exists():
        return pinned
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise AnvilError(f"anvil not found at {pinned} nor on PATH; run `npm ci` (make setup) first")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a server does: connections of a stopped chain lingering in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Anvil:
    """One anvil process on loopback; stop() (or leaving the `with` block) kills it."""

    def __init__(self, chain_id: int = DEFAULT_CHAIN_ID, port: int | None = None, block_time: float | None = None,
                 accounts: int = 10, host: str = "127.0.0.1", startup_timeout: float = 15.0) -> None:
        self.chain_id = chain_id
        self.host = host
        self.port = port or free_port(host)
        self._block_time = block_time
        self._accounts = accounts
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self.w3: Web3 | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        """The funded dev accounts, as eth-account signers."""
        return DEV_ACCOUNTS[: self._accounts]

    def start(self) -> Anvil:
        if self._process is not None:
            return self
        # Otherwise another chain already listening there would answer and pass for ours.
        if not port_is_free(self.port, self.host):
            raise AnvilError(f"port {self.port} on {self.host} is already in use")
        command = [str(anvil_binary()), "--host", self.host, "--port", str(self.port), "--chain-id",
                   str(self.chain_id), "--accounts", str(self._accounts), "--silent"]
        if self._block_time is not None:
            command += ["--block-time", str(self._block_time)]
        # stderr goes to a file, not a pipe: a pipe nobody drains would block anvil once it fills.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self.w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 30}))
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                process, self._process = self._process, None
                self._stderr.seek(0)
                stderr = self._stderr.read().decode(errors="replace")
                raise AnvilError(f"anvil exited with {process.returncode}: {stderr.strip()}")
            try:
                if self.w3.eth.chain_id == self.chain_id:
                    return self
            except Exception:  # connection refused until anvil listens
                time.sleep(0.05)
        self.stop()
        raise AnvilError(f"anvil did not answer on {self.url} within {self._startup_timeout}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Test helpers over anvil's RPC extensions.
    def snapshot(self) -> str:
        """Save the chain state; revert(id) returns to it (each id is usable once)."""
        return self.w3.provider.make_request("evm_snapshot", [])["result"]

    def revert(self, snapshot_id: str) -> None:
        response = self.w3.provider.make_request("evm_revert", [snapshot_id])
        if not response.get("result"):
            raise AnvilError(f"evm_revert({snapshot_id}) failed: {response}")

    def increase_time(self, seconds: int) -> None:
        """Move the clock forward and mine a block so `block.timestamp` reflects it."""
        self.w3.provider.make_request("evm_increaseTime", [int(seconds)])
        self.w3.provider.make_request("evm_mine", [])

    def mine(self) -> None:
        self.w3.provider.make_request("evm_mine", [])
