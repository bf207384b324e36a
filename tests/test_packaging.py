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


def test_readme_links_stay_inside_the_repository_and_name_no_internal_labels():
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README_gpu.md", ROOT / "docs" / "spec.md"]:
        text = doc.read_text()
        assert "../shared" not in text and "SESSA_SPEC" not in text, doc
        assert not re.search(r"\bissues? \d+\b|issue target", text, re.IGNORECASE), doc
        for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):  # markdown links to files must exist
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    assert "(docs/spec.md)" in (ROOT / "README.md").read_text()
