"""Compiled contract artifacts (ABI + bytecode) from `contracts/build/`, checked against the sources.

`node contracts/build.js` writes one JSON per contract with `sources_sha256`, the SHA-256 over every
`contracts/src/**/*.sol` file; loading an artifact whose hash differs from the sources on disk raises
`StaleArtifacts`, so nobody deploys bytecode that no longer matches the Solidity they read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parent
SOURCES_DIR = CONTRACTS_DIR / "src"
BUILD_DIR = CONTRACTS_DIR / "build"
CONTRACT_NAMES = ("OpenToken", "Registry", "PaymentChannels", "AttributionLedger")
BUILD_COMMAND = "node contracts/build.js"


class ArtifactError(RuntimeError):
    """An artifact is missing or unreadable."""


class StaleArtifacts(ArtifactError):
    """The artifacts were compiled from other sources than the ones on disk."""

    def __init__(self, name: str, artifact_hash: str, sources_hash: str) -> None:
        super().__init__(f"contracts/build/{name}.json was built from sources {artifact_hash[:12]}, "
                         f"but contracts/src hashes to {sources_hash[:12]}; run `{BUILD_COMMAND}`")
        self.name = name
        self.artifact_hash = artifact_hash
        self.sources_hash = sources_hash


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One compiled contract: what web3 needs to deploy and call it."""

    name: str
    abi: list[dict]
    bytecode: str
    deployed_bytecode: str
    sources_sha256: str


def source_files(sources_dir: Path = SOURCES_DIR) -> list[Path]:
    """Every .sol file under `sources_dir`, sorted by relative POSIX path (the order the hash uses)."""
    return sorted(sources_dir.rglob("*.sol"), key=lambda p: p.relative_to(sources_dir).as_posix())


def sources_sha256(sources_dir: Path = SOURCES_DIR) -> str:
    """SHA-256 over (relative path, NUL, bytes, NUL) of each source; must match build.js's sourcesHash."""
    digest = hashlib.sha256()
    for path in source_files(sources_dir):
        digest.update(path.relative_to(sources_dir).as_posix().encode())
        digest.update(b"\x00")
        digest.update(path.read_bytes())
        digest.update(b"\x00")
    return digest.hexdigest()


def load_artifact(name: str, build_dir: Path = BUILD_DIR, check_sources: bool = True) -> Artifact:
    """Read `build_dir/<name>.json`; raise StaleArtifacts if the sources changed since it was built."""
    path = build_dir / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ArtifactError(f"{path} is missing; run `{BUILD_COMMAND}`") from error
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}); run `{BUILD_COMMAND}`") from error
    # Installed wheels carry build/ but may not carry src/; only check when the sources are there.
    if check_sources and SOURCES_DIR.is_dir():
        current = _current_sources_hash()
        if data["sources_sha256"] != current:
            raise StaleArtifacts(name, data["sources_sha256"], current)
    return Artifact(name=name, abi=data["abi"], bytecode=data["bytecode"],
                    deployed_bytecode=data["deployedBytecode"], sources_sha256=data["sources_sha256"])


@functools.cache
def _current_sources_hash() -> str:
    return sources_sha256()


def load_all() -> dict[str, Artifact]:
    """All four artifacts by contract name."""
    return {name: load_artifact(name) for name in CONTRACT_NAMES}
