"""What the packaging says is true: the Python versions the pins need, the license, and a README that points
only inside the repository."""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict:
    out = {}
    for line in (ROOT / "requirements" / "all.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip()] = version.strip()
    return out


def test_requires_python_is_what_the_pins_need():
    claimed = SpecifierSet(PROJECT["requires-python"])
    lowest = Version("3.11")
    assert lowest in claimed and Version("3.10") not in claimed
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") in claimed  # this interpreter
    needs = {}
    for name, version in pins().items():
        installed = md.version(name)
        assert installed.split("+")[0] == version, f"{name}: pinned {version}, installed {installed}"
        needs[name] = SpecifierSet(md.metadata(name).get("Requires-Python") or "")
    # every pin installs on the lowest Python the project claims ...
    assert all(lowest in spec for spec in needs.values()), {n: str(s) for n, s in needs.items() if lowest not in s}
    # ... and claiming one minor version lower would be false
    assert any(Version("3.10") not in spec for spec in needs.values())


def test_license_file_is_the_apache_license_the_metadata_names():
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"]["text"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


# Pages that other branches add; the README links them already. Empty this once they are merged.
def docs() -> list:
    return [ROOT / "README.md", ROOT / "benchmarks" / "README_gpu.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]


def test_readme_links_stay_inside_the_repository_and_name_no_internal_labels():
    for doc in docs():
        text = doc.read_text()
        assert "../shared" not in text and "SESSA_SPEC" not in text, doc
        assert not re.search(r"\bissues? \d+\b|issue target", text, re.IGNORECASE), doc
        # the docs speak of the software, not of how the work on it was organised
        assert not re.search(r"\blent\b|\bthe tasks\b|this round\b", text, re.IGNORECASE), doc
        for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):  # markdown links to files must exist
            if not target.startswith(("http://", "https://")):
                path = (doc.parent / target).resolve()
                assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
                assert path.exists(), f"{doc.name} links to missing {target}"
    assert "(docs/spec.md)" in (ROOT / "README.md").read_text()


def test_readme_is_short_and_the_quick_start_is_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.DOTALL)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 2, blocks
    assert text.index("python3 -m venv") < text.index("## Quick start")  # install before any command
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[0].strip().splitlines()[1].split("&& ")[-1] in ci  # CI runs the README's test command


def test_pyproject_points_to_sections_that_exist():
    text = (ROOT / "README.md").read_text()
    for section in re.findall(r"README's ([A-Z][a-z]+) section", (ROOT / "pyproject.toml").read_text()):
        assert f"## {section}" in text, section
