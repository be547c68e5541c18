"""Building the C kernels: a build is keyed by its source and the local headers it includes."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from longtail.kernels.native import NativeLibrary, library_path


def test_a_changed_header_is_a_new_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_HOME", str(tmp_path / "home"))
    source = tmp_path / "kernel.c"
    source.write_text('#include "value.h"\nint longtail_value(void) { return VALUE; }\n')
    (tmp_path / "value.h").write_text("#define VALUE 1\n")
    first = library_path(source)
    (tmp_path / "value.h").write_text("#define VALUE 2\n")
    assert library_path(source) != first
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")

    def declare(library: ctypes.CDLL) -> None:
        library.longtail_value.restype = ctypes.c_int

    library = NativeLibrary(source, declare).get()
    assert library is not None and library.longtail_value() == 2
    assert library_path(source).exists()


def test_a_header_included_by_a_header_keys_the_build_too(tmp_path):
    """gemm_fp32.c includes lora_pair.h, which includes simd.h: a change two includes down is a new build."""
    source = tmp_path / "kernel.c"
    source.write_text('#include "outer.h"\nint longtail_value(void) { return VALUE; }\n')
    (tmp_path / "outer.h").write_text('#include "inner.h"\n#include "outer.h"\n')  # a cycle is read once
    (tmp_path / "inner.h").write_text("#define VALUE 1\n")
    first = library_path(source)
    (tmp_path / "inner.h").write_text("#define VALUE 2\n")
    assert library_path(source) != first


def test_a_kernel_that_cannot_build_is_unavailable_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_HOME", str(tmp_path / "home"))
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    broken = NativeLibrary(source, lambda library: None)
    assert broken.get() is None and not broken.available()
    monkeypatch.setenv("LONGTAIL_KERNELS", "torch")
    assert not NativeLibrary(source, lambda library: None).available()
