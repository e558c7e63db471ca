"""Packaging: everything installs under `dapdee`, the mapping names every package folder, and no
code imports the folders by their generic names (`services`, `clients`, `bench`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _setuptools_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """The folder setuptools installs `package` from: the longest mapped prefix, else the name."""
    parts = package.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[k:])
    return ROOT / Path(*parts)


def test_only_dapdee_is_installed_at_top_level() -> None:
    cfg = _setuptools_config()
    assert {p.split(".")[0] for p in cfg["packages"]} == {"dapdee"}


def test_every_package_folder_is_listed_and_every_listed_package_exists() -> None:
    cfg = _setuptools_config()
    mapping = cfg["package-dir"]
    listed = {_folder_of(p, mapping).resolve(): p for p in cfg["packages"]}
    for folder in listed:
        assert (folder / "__init__.py").is_file(), f"{listed[folder]}: {folder} has no __init__.py"
    roots = [ROOT / "dapdee", *(ROOT / d for d in mapping.values())]
    found = {
        init.parent.resolve() for root in roots for init in root.rglob("__init__.py") if "results" not in init.parts
    }
    missing = sorted(str(f.relative_to(ROOT)) for f in found - set(listed))
    assert not missing, f"package folders not installed (add them to pyproject's packages): {missing}"


def test_no_code_imports_the_folders_by_generic_names() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(services|clients|bench)\b", re.M)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part in (".venv", ".git", "build") for part in path.parts):
            continue
        if pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import dapdee.* instead: {offenders}"


def test_cli_reports_the_installed_version() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    out = subprocess.run(
        [sys.executable, "-m", "dapdee.cli", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == f"dapdee {version}"
