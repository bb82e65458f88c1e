"""The one-way data flow of docs/architecture.md, enforced: import-linter's contracts (pyproject's
[tool.importlinter]) and the house rules no linter checks (registries without import cycles,
nothing of benchmarks/ imported by the library)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sparsetrain"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_are_kept():
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(_contracts())} kept, 0 broken" in done.stdout


def test_every_library_module_is_held_to_the_no_cli_contract():
    # a new top-level module must not escape the contract because nobody added it to the list
    (contract,) = [c for c in _contracts() if c["forbidden_modules"] == ["sparsetrain.cli"]]
    modules = {f"sparsetrain.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {f"sparsetrain.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "cli"}
    assert set(contract["source_modules"]) == modules


def test_no_imports_at_the_bottom_of_a_package_and_nothing_of_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "noqa: E402" not in text, f"{path}: an import after code (a package <-> child cycle?)"
        assert not re.search(r"^\s*(from|import) benchmarks", text, re.M), path
        assert "sys.path" not in text, path


def test_cli_is_a_package():
    assert (PACKAGE / "cli" / "__init__.py").is_file()


def test_the_cli_reference_is_current():
    # a fresh process: the help lists the registries as a user's process sees them
    done = subprocess.run([sys.executable, "-m", "sparsetrain.cli.reference"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (ROOT / "docs" / "cli.md").read_text() == done.stdout, (
        "docs/cli.md is stale: python -m sparsetrain.cli.reference > docs/cli.md")
