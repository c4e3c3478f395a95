"""The reference pages are generated from the code (job/docgen.py, `make docs`): a page that differs from what
the code generates is stale. The README's links lead to pages that exist, and its exit-code table has every code."""
import re

import pytest

from conftest import ROOT
from job import docgen
from job.errors import EXIT_CODES


@pytest.mark.parametrize("name", sorted(docgen.PAGES))
def test_each_reference_page_is_what_the_code_generates(name):
    page = ROOT / "docs" / "reference" / name
    assert page.is_file(), f"docs/reference/{name} is missing: run `make docs`"
    assert page.read_text() == docgen.PAGES[name](), f"docs/reference/{name} is stale: run `make docs`"


def test_the_readme_links_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|jobspecs)/[^)#]*)\)", text)
    assert links
    for link in links:
        assert (ROOT / link).exists(), link


def test_the_readme_exit_codes_are_the_codes():
    text = (ROOT / "README.md").read_text()
    table = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    assert [int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)] == list(EXIT_CODES)
