"""The README's support section is exactly ``python -m fxcurv.support``'s output."""
from pathlib import Path

from fxcurv.support import BEGIN, END, render


def test_readme_support_table_matches_rule_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == render().strip(), (
        "README support table is stale: run `python -m fxcurv.support --update-readme`")
