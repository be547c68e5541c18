"""Building and loading the CPU engine's C kernels (`kernels/csrc/*.c`): one way for every kernel.

A kernel is compiled with the system C compiler on first use into `$LONGTAIL_HOME/kernels/`, one file
per (source and the local headers it includes, flags, CPU), so a stale build is never loaded; ctypes
releases the GIL while a kernel runs. Without a compiler, or with `LONGTAIL_KERNELS=torch`, a kernel is
unavailable and its callers use the torch reference beside it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -fopenmp: kernels share their work among torch's OpenMP threads (they link libgomp.so.1 by soname, so the
# loader reuses the copy torch brought: one thread pool).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
# No FMA contraction: products and sums round as torch's separate multiply and add do.
EXACT_FLAGS = (*FLAGS, "-ffp-contract=off")


def _home() -> Path:
    return Path(os.environ.get("LONGTAIL_HOME") or Path.home() / ".cache" / "longtail")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _source_bytes(source: Path, seen: set[Path] | None = None) -> bytes:
    """The source and every local header it includes (`#include "x.h"`), and theirs: what the build depends on."""
    seen = set() if seen is None else seen
    seen.add(source)
    text = source.read_bytes()
    headers = [source.parent / h.decode() for h in re.findall(rb'^\s*#include\s+"([^"]+)"', text, flags=re.MULTILINE)]
    return text + b"".join(_source_bytes(h, seen) for h in headers if h not in seen)


def library_path(source: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Where a compiled kernel lives: keyed by source, headers, flags and CPU."""
    key = hashlib.sha256(_source_bytes(source) + " ".join(flags).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    return _home() / "kernels" / f"{source.stem}-{key}.so"


def build(target: Path, source: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile a kernel into `target` (atomically: concurrent builders never see half a file)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    result = subprocess.run([compiler, *flags, "-o", str(partial), str(source), "-lm"], capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {source.name}: {result.stderr.strip()[:2000]}")
    os.replace(partial, target)
    return target


def forced_torch() -> bool:
    """`LONGTAIL_KERNELS=torch`: every C kernel off, the torch references used."""
    return os.environ.get("LONGTAIL_KERNELS", "").strip().lower() == "torch"


class NativeLibrary:
    """One C kernel library, built and loaded on first use; `get()` is None when it cannot be (logged once)."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], flags: tuple[str, ...] = FLAGS) -> None:
        self.source, self.flags, self._declare = source, flags, declare
        self._library: ctypes.CDLL | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._library
        self._tried = True
        try:
            path = library_path(self.source, self.flags)
            if not path.exists():
                build(path, self.source, self.flags)
            library = ctypes.CDLL(str(path))
            self._declare(library)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            log.warning("C kernel %s unavailable, using the torch reference: %s", self.source.name, error)
            return None
        self._library = library
        return library

    def available(self) -> bool:
        """True when the library is built (or builds now) and `LONGTAIL_KERNELS` does not force torch."""
        return not forced_torch() and self.get() is not None
