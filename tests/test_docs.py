"""The documentation holds together: a short README, links that resolve, and every measured number's file
regenerable by a named make target and recording what produced it."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PERF = re.compile(r"<!-- perf: (\S+) \(make ([\w-]+)[^)]*\) -->")


def targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_readme_is_the_short_entry_point() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for command in ("make demo", "make test"):
        assert command in text
    for guide in ("inference", "serving", "training", "quantization", "pruning", "nano", "performance",
                  "architecture"):
        assert f"docs/{guide}.md" in text, guide


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_measured_numbers_cite_a_regenerable_file_with_provenance() -> None:
    make = targets()
    cited = []
    for page in PAGES:
        text = page.read_text()
        assert "TBD" not in text, f"{page.relative_to(ROOT)} still has TBD values"
        for file, target in PERF.findall(text):
            cited.append(file)
            assert target in make, f"{page.relative_to(ROOT)} cites `make {target}`, which the Makefile lacks"
            for path in sorted(ROOT.glob(file)) or [ROOT / file]:
                assert path.is_file(), f"{page.relative_to(ROOT)} cites {file}, which does not exist"
                if path.suffix == ".json":
                    assert "provenance" in json.loads(path.read_text()), f"{file} does not record what produced it"
    assert cited, "no measured numbers are cited at all"
