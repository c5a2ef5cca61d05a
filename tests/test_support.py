"""``docs/support.md`` and the README's quantity list are exactly what
``python -m fxcurv.support --update`` writes from the rule table."""
from pathlib import Path

from fxcurv.support import between_markers, page, quantity_list

ROOT = Path(__file__).parents[1]
STALE = ("is stale: run `python -m fxcurv.support --update` "
         "(rewrites docs/support.md and README.md)")


def test_support_page_matches_rule_table():
    text = (ROOT / "docs" / "support.md").read_text(encoding="utf-8")
    assert text == page(), f"docs/support.md {STALE}"


def test_readme_quantity_list_matches_quantity_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert between_markers(readme).strip() == quantity_list().strip(), \
        f"README's quantity list {STALE}"
