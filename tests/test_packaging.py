"""Import names: ours live under `longtail.*` and never shadow an installed package (docs/packaging.md).

Each check runs in a fresh interpreter of this venv, from the repository root (where the card's
folders sit on the current directory) and from an unrelated folder, the two places a user starts
Python from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("node", "serving", "attribution", "contracts", "kernels", "scripts")
GENERIC_NAMES = (*PARTS, "tests")

# Every module of ours, imported by its `longtail.` name; each must resolve to this checkout's file.
EVERY_MODULE = f"""
import importlib, json, pathlib, pkgutil, sys
repo = pathlib.Path(sys.argv[1])
names = []
for part in {PARTS!r}:
    package = importlib.import_module("longtail." + part)
    names += [info.name for info in pkgutil.walk_packages(package.__path__, "longtail." + part + ".")]
failed = {{}}
for name in names:
    try:
        module = importlib.import_module(name)
        assert pathlib.Path(module.__file__).resolve().is_relative_to(repo), module.__file__
    except BaseException as error:
        failed[name] = repr(error)
print(json.dumps({{"modules": len(names), "failed": failed}}))
"""


def _python(code: str, cwd: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """Plain `python -c` (it puts the current folder first on sys.path, unlike our Makefile's `-P`)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    if path:
        env["PYTHONPATH"] = path
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(params=["repository root", "another folder"])
def start_folder(request, tmp_path) -> Path:
    return REPO if request.param == "repository root" else tmp_path


def test_transformers_gets_its_own_kernels_package(start_folder):
    """transformers >= 5.25 imports Hugging Face's `kernels`; our kernels/ folder must never answer it."""
    code = ("import importlib.util, json\n"
            "from transformers.integrations import hub_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(json.dumps({'origin': spec.origin if spec else None}))")
    result = _python(code, start_folder)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = json.loads(result.stdout.splitlines()[-1])["origin"]
    # Either HF's package (site-packages) or none at all: never our kernels/ folder.
    assert origin is None or not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin


def test_no_folder_of_ours_shadows_an_installed_package(start_folder, tmp_path_factory):
    """A regular package named like any of our folders (as a shared site-packages may hold) wins over ours."""
    site = tmp_path_factory.mktemp("site")
    for name in GENERIC_NAMES:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"OWNER = 'site-packages {name}'\n")
    code = ("import importlib, json\n"
            f"print(json.dumps({{n: getattr(importlib.import_module(n), 'OWNER', None) for n in {GENERIC_NAMES!r}}}))")
    result = _python(code, start_folder, path=str(site))
    assert result.returncode == 0, result.stderr[-2000:]
    owners = json.loads(result.stdout.splitlines()[-1])
    assert owners == {name: f"site-packages {name}" for name in GENERIC_NAMES}


def test_every_module_of_ours_imports_under_longtail(start_folder):
    result = _python(EVERY_MODULE, start_folder, str(REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failed"] == {}
    assert report["modules"] > 60, "the walk found our modules"


def test_card_folders_are_not_regular_packages():
    """An __init__.py in a top-level folder would make it shadow a same-named installed package again."""
    assert [part for part in (*PARTS, "tests") if (REPO / part / "__init__.py").exists()] == []


@pytest.mark.parametrize("cwd", ["repository root", "another folder"])
def test_console_script_runs_anywhere(cwd, tmp_path):
    script = Path(sys.executable).with_name("longtail")
    result = subprocess.run([str(script), "--help"], cwd=REPO if cwd == "repository root" else tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "node" in result.stdout
