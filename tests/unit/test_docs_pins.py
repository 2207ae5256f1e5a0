"""The docs stay true to the code: the settings table holds every setting with its flag and environment
variable and every serve flag, the error table every error code with its status; and the README stays the
front page, short, naming real make targets and linking to every docs page, and only to pages that exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from embedserve import errors
from embedserve.cli import build_parser
from embedserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_MAX_LINES = 250  # the front page; the manual lives in docs/


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _cells(row: str) -> list[str]:
    """The cells of a Markdown table row; a `|` inside backticks belongs to its cell."""
    cells, cell, code = [], "", False
    for char in row.strip().strip("|"):
        if char == "`":
            code = not code
        if char == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (header and rule left out) of the tables in the section under `heading`."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    section: list[str] = []
    for line in lines[start:]:
        if re.match(rf"#{{1,{len(level)}}} ", line):
            break
        section.append(line)
    rows = [_cells(line) for line in section if line.startswith("|")]
    return [row for row in rows if not set("".join(row)) <= set("-: ") and row[0] not in ("flag", "status")]


SETTINGS_TABLE = _table(_page("settings.md"), "# Settings")
ERROR_TABLE = _table(_page("http-api.md"), "## Limits and errors")


def test_the_tables_are_found_where_the_docs_keep_them() -> None:
    assert len(SETTINGS_TABLE) >= len(Settings.model_fields)
    assert len(ERROR_TABLE) >= 20


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_has_a_row_with_its_environment_variable(field: str) -> None:
    assert any(f"`EMBEDSERVE_{field.upper()}`" in row[1] for row in SETTINGS_TABLE)


def test_every_environment_variable_in_the_settings_table_is_a_setting() -> None:
    named = {name for row in SETTINGS_TABLE for name in re.findall(r"`EMBEDSERVE_(\w+)`", row[1])}
    assert named
    assert named <= {field.upper() for field in Settings.model_fields}


def _serve_flags() -> list[tuple[str, str]]:
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]  # type: ignore[index]
    return sorted(
        (opt, action.dest)
        for action in serve._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt not in ("--help", "--json")
    )


@pytest.mark.parametrize(("flag", "dest"), _serve_flags())
def test_every_serve_flag_is_in_the_settings_row_of_its_setting(flag: str, dest: str) -> None:
    rows = [row for row in SETTINGS_TABLE if f"`EMBEDSERVE_{dest.upper()}`" in row[1]]
    assert rows, f"no settings row for {dest}"
    assert any(f"`{flag}`" in row[0] for row in rows)


def _errors() -> list[tuple[int, str]]:
    return sorted(
        {
            (cls.status, cls.code)
            for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.EmbedServeError)
            and cls.code
            and cls.status < 600
            and cls not in (errors.ModelLoadError, errors.ConfigError)
        }
    )


@pytest.mark.parametrize(("status", "code"), _errors())
def test_every_error_code_is_in_the_error_table_with_its_status(status: int, code: str) -> None:
    assert [str(status), f"`{code}`"] in [row[:2] for row in ERROR_TABLE]


def test_every_code_in_the_error_table_is_one_the_server_answers() -> None:
    answered = {(str(status), f"`{code}`") for status, code in _errors()}
    assert {(row[0], row[1]) for row in ERROR_TABLE} <= answered


def test_the_readme_stays_a_front_page() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES


def _readme_links() -> list[str]:
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", README) if not re.match(r"\w+:", target)]


def _nav_pages() -> list[str]:
    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [page for item in node for page in pages(item)]
        if isinstance(node, dict):
            return [page for value in node.values() for page in pages(value)]
        return []

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    return pages(config["nav"])


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc both make it, for the plain headings the docs use."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("target", _readme_links())
def test_every_readme_link_reaches_a_docs_page_of_the_site(target: str) -> None:
    path, _, anchor = target.partition("#")
    assert path.startswith("docs/"), "the README links to the docs site, nowhere else in the repository"
    assert path.removeprefix("docs/") in _nav_pages()
    if anchor:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), re.MULTILINE)
        assert anchor in {_slug(heading) for heading in headings}


def test_the_readme_links_every_page_of_the_site() -> None:
    linked = {target.partition("#")[0].removeprefix("docs/") for target in _readme_links()}
    assert set(_nav_pages()) <= linked


def test_every_make_target_the_readme_and_docs_name_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    texts = [README, *(page.read_text(encoding="utf-8") for page in DOCS.rglob("*.md"))]
    named = {name for text in texts for name in re.findall(r"`make ([\w-]+)", text)}
    assert {"serve", "test", "docs"} <= named
    assert named <= targets
