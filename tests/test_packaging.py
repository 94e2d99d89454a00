"""The package builds without warnings and ships every module and data file it reads."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_wheel_builds_cleanly_and_ships_every_module_and_data_file(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-v", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    output = build.stdout + build.stderr
    for warning in ("Deprecat", "is absent from the `packages`", "license"):
        lines = [line for line in output.splitlines() if warning in line and "warn" in line.lower()]
        assert not lines, lines
    [wheel] = tmp_path.glob("billing_ledger-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {
        str(p.relative_to(ROOT))
        for top in ("ledger", "projections", "schemas")
        for p in (ROOT / top).rglob("*")
        if p.suffix in (".py", ".sql", ".toml", ".avsc", ".html", ".css")
        and "__pycache__" not in p.parts
    }
    assert on_disk - shipped == set()
    assert any(name.endswith("licenses/LICENSE") for name in shipped)
