"""The README and the docs pages: every relative link and image resolves (anchors included), every config,
script or data file a command block names exists, every `tuneline` command they name exists, and mkdocs'
navigation lists every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(?:bash|sh)\n(.*?)```", re.S)
NAMED_FILE = re.compile(r"(?<![\w/.])((?:configs|bench|data|evals)/[\w./-]+\.(?:yaml|py|jsonl))")
COMMAND = re.compile(r"\btuneline ((?:feedback )?[a-z][a-z-]*)")


def anchors(page: Path) -> set[str]:
    """Heading slugs as GitHub and mkdocs make them: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_named_in_command_blocks_exist(page):
    named = {m for block in FENCE.findall(page.read_text()) for m in NAMED_FILE.findall(block)}
    assert all((ROOT / m).exists() for m in named), sorted(m for m in named if not (ROOT / m).exists())


def test_every_tuneline_command_the_pages_name_exists():
    from typer.main import get_command

    from flows.cli import app

    cli = get_command(app)
    known = set(cli.commands) | {f"feedback {name}" for name in cli.commands["feedback"].commands}
    named = {(page.name, m) for page in PAGES for block in FENCE.findall(page.read_text())
             for m in COMMAND.findall(block)}
    assert {m for _, m in named} & known >= {"up", "run", "status", "feedback approve"}  # the pattern still finds
    assert sorted((page, m) for page, m in named if m not in known) == []


def test_readme_is_a_front_door_and_mkdocs_lists_every_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(entry.values())) for entry in nav}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
