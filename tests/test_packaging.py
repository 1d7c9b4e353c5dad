"""The distribution installs every package of the source tree (pyproject lists packages explicitly)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(base).parts
            found.add(".".join((name, *relative)))
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    # Folders of modules without __init__.py (views) are packages to setuptools too.
    for name, folder in setuptools["package-dir"].items():
        for sub in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in sub.parts or (sub.parent / "__init__.py").exists():
                continue
            package = ".".join((name, *sub.parent.relative_to(ROOT / folder).parts))
            assert package in listed, f"{sub.relative_to(ROOT)}: add {package} to [tool.setuptools] packages"


def test_every_entry_point_of_pyproject_is_installed_and_loads():
    """Plug-in groups (CLI commands, analyses, dataset and label-set providers) resolve to their objects; a group
    missing from the installed metadata means the venv predates pyproject (``make venv`` reinstalls it)."""
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert "workbench.labels" in groups and "workbench.datasets" in groups
    for group, entries in groups.items():
        installed = {entry.name: entry for entry in importlib.metadata.entry_points(group=group)}
        for name, value in entries.items():
            assert name in installed and installed[name].value == value, (
                f"{group} {name}: reinstall (make venv)"
            )
            assert installed[name].load() is not None


def test_the_command_line_starts_without_importing_torch_or_the_analyses():
    """`workbench --help` lists every command (core and plugins) without importing torch, transformers or an
    analysis: those load inside the command that runs (issue 34: ≤ 1.5 s of imports at start-up)."""
    probe = (
        "import sys, workbench.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'transformer_lens', 'sae_lens', 'streamlit', 'triton')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", f"imported at CLI start-up: {done.stdout.strip()}"
    listed = subprocess.run([sys.executable, "-m", "workbench.cli", "--help"], capture_output=True, text=True,
                            timeout=120, check=True).stdout  # fmt: skip
    for command in ("info", "capture", "massive", "attention", "dynamics", "sae", "probe", "circuits"):
        assert f" {command} " in listed, f"{command} missing from `workbench --help`"
