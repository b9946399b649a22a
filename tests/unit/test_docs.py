"""docs/settings.md is generated from Settings (mtaq/docgen.py, `make docs`): the committed file
must be what the code says today, and the generator must take any field a feature adds."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from common.settings import Settings, _opt
from mtaq.docgen import render_settings, sections
from tests.fixtures import ROOT


def test_the_committed_settings_reference_is_current() -> None:
    committed = (ROOT / "docs/settings.md").read_text()
    assert committed == render_settings(), "docs/settings.md is stale: run `make docs` and commit it"


def test_every_setting_is_documented_once_with_its_default_and_help() -> None:
    text = render_settings()
    for f in dataclasses.fields(Settings):
        rows = [line for line in text.splitlines() if line.startswith(f"| `{f.name}` ")]
        assert len(rows) == 1, f.name
        assert f"MTAQ_{f.name.upper()}" in rows[0]
        first_words = " ".join(str(f.metadata["help"]).split()[:3])
        assert first_words.replace("|", "\\|") in rows[0], f.name


def test_sections_follow_the_comments_in_settings() -> None:
    where = sections()
    assert where["listen"] == "Where things are"
    assert where["relayhost"] == "Delivery (worker)"
    assert where["verify_timeout"] == "Inbound relay without backscatter (ingress)"
    headings = re.findall(r"^## (.+)$", render_settings(), re.M)
    assert len(headings) == len(set(headings)) >= 4


@dataclasses.dataclass(frozen=True)
class _Grown(Settings):
    # -- a feature added at the end, as helpers do
    widget_limit: int = _opt(7, "widgets | per message", ("worker",))
    widget_mode: str = dataclasses.field(default="")  # no help, no roles


def test_a_field_added_at_the_end_is_rendered_in_its_own_section() -> None:
    text = render_settings(_Grown)
    section = text[text.index("## A feature added at the end, as helpers do") :]
    assert "| `widget_limit` (`MTAQ_WIDGET_LIMIT`) | `7` | worker | widgets \\| per message |" in section
    assert "| `widget_mode` (`MTAQ_WIDGET_MODE`) | unset | all |  |" in section
    assert text.count("## Where things are") == 1


def test_check_mode_says_stale_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "settings.md"
    out.write_text("old\n")
    cmd = [sys.executable, "-m", "mtaq.docgen", "--output", str(out)]
    stale = subprocess.run([*cmd, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert stale.returncode == 1 and "stale: run `make docs`" in stale.stderr
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    assert subprocess.run([*cmd, "--check"], cwd=ROOT, capture_output=True).returncode == 0
    assert out.read_text() == render_settings()


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert len(pages) >= 7 and broken == []


def test_the_readme_keeps_its_performance_heading_last() -> None:
    # other features append their short sections just before it
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M)
    assert headings[-1] == "Performance" and "docs/performance.md" in (ROOT / "README.md").read_text()
