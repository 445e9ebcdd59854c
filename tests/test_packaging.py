"""The fixed layout maps onto import names through pyproject: every package must be listed, and a
plain (non-editable) install must carry the shipped config and model repository."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO

ROOTS = {"framework": "pagedserve", "plugins": "pagedserve_plugins", "conf": "pagedserve.conf"}


def _declared() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed() -> None:
    found = set()
    for folder, name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *relative.parts]))
    assert found == _declared()


@pytest.mark.slow
def test_non_editable_install_serves_shipped_repository(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    assert (target / "pagedserve" / "conf" / "config.yaml").is_file()
    assert (target / "pagedserve" / "conf" / "models" / "simple.yaml").is_file()
    assert (target / "pagedserve" / "protocol" / "grpc_service_pb2.py").is_file()
    code = "import pagedserve.config as c; print(c.ServeConfig().repository_path())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / "pagedserve" / "conf" / "models"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    test_commands = [block for block in blocks if "pytest" in block and "pip install" in block]
    assert len(test_commands) == 1, "the README has one test command"
    ci_lines = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == test_commands[0]
