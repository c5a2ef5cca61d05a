"""Every ``python`` code block of README.md and docs/*.md runs.

The blocks of one page run in order, in one namespace, in a temporary directory.
README.md starts from an empty namespace (its blocks run exactly as written); a page under
docs/ starts from the prelude, the first ``python`` block of docs/README.md (a small CNN
``model``, a batch ``x``, ``y`` and ``loss_fn``). A data-parallel block may leave a process
group behind; it is destroyed after the page.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each ``python`` block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


PRELUDE = python_blocks(ROOT / "docs" / "README.md")[0][1]


def test_pages_have_blocks():
    """The extraction finds the README's example and the prelude (a broken fence would hide
    blocks from the test below)."""
    assert len(python_blocks(ROOT / "README.md")) >= 2
    assert "model" in PRELUDE and "loss_fn" in PRELUDE


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_snippet__"}
    rng = torch.get_rng_state()
    try:
        if page.parent.name == "docs":
            exec(compile(PRELUDE, "docs/README.md (prelude)", "exec"), namespace)
        for line, source in python_blocks(page):
            name = f"{page.relative_to(ROOT).as_posix()}:{line}"
            exec(compile("\n" * (line - 1) + source, name, "exec"), namespace)
    finally:
        torch.set_rng_state(rng)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files(page):
    """Every relative link (``[text](docs/x.md)``, ``(x.md#part)``) names an existing file."""
    targets = [t for t in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
