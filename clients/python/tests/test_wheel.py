"""The package builds as a wheel (offline: the installed setuptools, no build isolation) with its CLI entry point."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def test_wheel_builds_with_modules_and_the_timbre_command(tmp_path: Path) -> None:
    # Built from a copy, so the build leaves nothing in the source tree.
    source = tmp_path / "timbre"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path, timeout=300)
    wheels = list((tmp_path / "dist").glob("timbre-0.1.0-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        assert {"timbre/__init__.py", "timbre/_client.py", "timbre/_async_client.py", "timbre/cli.py",
                "timbre/webhooks.py", "timbre/py.typed"} <= names
        entry_points = wheel.read("timbre-0.1.0.dist-info/entry_points.txt").decode()
        metadata = wheel.read("timbre-0.1.0.dist-info/METADATA").decode()
    assert "timbre = timbre.cli:main" in entry_points
    assert "Requires-Dist: httpx" in metadata and "Requires-Dist: click" in metadata
