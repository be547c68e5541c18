"""What `longtail doctor` checks: each part a node needs, and whether it is ready."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_BIN = REPO_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
SOLC_PACKAGE = REPO_ROOT / "node_modules" / "solc" / "package.json"


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    part: str
    ready: bool
    detail: str
    required: bool = True


def check_python() -> Check:
    version = platform.python_version()
    return Check("python", tuple(map(int, version.split(".")[:2])) >= (3, 11), version)


def check_torch() -> Check:
    try:
        import torch
    except ImportError as error:
        return Check("torch", False, str(error))
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return Check("torch + device", True, f"{torch.__version__} on {device}")


def check_triton() -> Check:
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return Check("triton", False, "not installed")
    import torch

    mode = "GPU kernels" if torch.cuda.is_available() else (
        "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "installed; CPU uses the torch path"
    )
    return Check("triton", True, f"{version}, {mode}")


def check_anvil() -> Check:
    binary = ANVIL_BIN if ANVIL_BIN.exists() else shutil.which("anvil")
    if not binary:
        return Check("anvil", False, "missing: run `make setup` (npm ci installs it)")
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return Check("anvil", False, f"{binary}: {error}")
    return Check("anvil", True, out.splitlines()[0] if out else str(binary))


def check_solc() -> Check:
    if not SOLC_PACKAGE.exists():
        return Check("solc-js", False, "missing: run `make setup` (npm ci installs it)")
    import json

    return Check("solc-js", True, json.loads(SOLC_PACKAGE.read_text())["version"])


def check_database(url: str | None = None) -> Check:
    from sqlalchemy import create_engine, text

    url = url or os.environ.get("LONGTAIL_DATABASE_URL") or f"sqlite:///{_default_sqlite_path()}"
    try:
        engine = create_engine(url)
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as error:  # any driver error means "not ready"; the detail says which
        return Check("database", False, f"{_redact(url)}: {type(error).__name__}")
    return Check("database", True, _redact(url))


def _redact(url: str) -> str:
    """Never print a database password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"


def check_base_model() -> Check:
    from longtail.serving.base_models import BaseModelError, describe, embedded_model_dir, find_embedded_gguf

    folder = embedded_model_dir()
    try:
        info = describe(folder)
        return Check("base model", True, f"{info.name}: {info.parameters / 1e6:.1f} M params at {folder}")
    except BaseModelError:
        try:
            gguf = find_embedded_gguf()
        except BaseModelError as error:
            return Check("base model", False, str(error))
        return Check("base model", False, f"{gguf.name} installed but not converted: run `make setup`")


ALL_CHECKS: tuple[Callable[[], Check], ...] = (
    check_python, check_torch, check_triton, check_anvil, check_solc, check_database, check_base_model,
)


def run_checks() -> list[Check]:
    return [check() for check in ALL_CHECKS]


def _default_sqlite_path() -> Path:
    from longtail.serving.base_models import longtail_home

    home = longtail_home()
    home.mkdir(parents=True, exist_ok=True)
    return home / "doctor-check.sqlite"
