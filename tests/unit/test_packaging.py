"""Install paths: the distribution name is ours, and every `pip install` that README.md,
docs/, deploy/ or CI show installs this checkout (or a wheel built from it), never a package of
that name from PyPI (`cdp` there is an unrelated 2015 package)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIP = re.compile(r"\bpip3?\s+install\s+([^`#;&|)\n]+)")


def _install_texts() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / ".ci" / "run"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += [p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix != ".json"]
    return {str(p.relative_to(ROOT)): p.read_text(errors="replace") for p in files}


def _local(arg: str) -> bool:
    """A path of this checkout or a wheel file, with or without [extras]."""
    arg = arg.split("[", 1)[0]
    return arg.startswith((".", "/")) or arg.endswith(".whl")


def test_the_distribution_name_is_ours_and_the_command_stays_cdp() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "cdp-replicator"
    assert project["scripts"] == {"cdp": "cdp.cli.main:entry"}


def test_every_pip_install_installs_this_checkout() -> None:
    seen = 0
    for name, text in _install_texts().items():
        for m in PIP.finditer(text):
            args = shlex.split(m.group(1).replace("\\\n", " "))
            if "--no-index" in args:  # a local wheel folder only: nothing comes from an index
                continue
            targets = []
            skip = False
            for a in args:
                if skip:
                    skip = False
                elif a in ("-e", "--editable"):
                    continue
                elif a in ("-r", "-c", "--find-links", "-f", "--target", "-t"):
                    skip = True
                elif not a.startswith("-"):
                    targets.append(a)
            ours = [t for t in targets if not t.startswith(("pip", "matplotlib"))]
            assert ours or "--upgrade" in args, f"{name}: {m.group(0)!r} installs nothing of ours"
            bad = [t for t in ours if not _local(t)]
            assert not bad, f"{name}: {m.group(0).strip()!r} installs {bad} from an index, not this checkout"
            seen += 1
    assert seen >= 4


def test_units_run_the_cdp_that_deploy_readme_installs() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "python3 -m venv /opt/cdp && /opt/cdp/bin/pip install ." in readme
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        execs = re.findall(r"^Exec(?:Start|StartPost)=(\S+)", unit.read_text(), re.M)
        assert execs and set(execs) == {"/opt/cdp/bin/cdp"}, unit.name
