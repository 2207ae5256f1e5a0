"""The README stays true: every setting appears with its flag and environment variable, every error code
in the error table, and every serve flag the CLI accepts is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from embedserve import errors
from embedserve.cli import build_parser
from embedserve.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented_with_its_environment_variable(field: str) -> None:
    assert f"EMBEDSERVE_{field.upper()}" in README


def _serve_flags() -> list[str]:
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]  # type: ignore[index]
    return sorted(
        opt
        for action in serve._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt not in ("--help", "--json")
    )


@pytest.mark.parametrize("flag", _serve_flags())
def test_every_serve_flag_is_documented(flag: str) -> None:
    assert f"`{flag}`" in README


def _codes() -> list[str]:
    return sorted(
        {
            cls.code
            for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.EmbedServeError)
            and cls.code
            and cls.status < 600
            and cls not in (errors.ModelLoadError, errors.ConfigError)
        }
    )


@pytest.mark.parametrize("code", _codes())
def test_every_error_code_is_in_the_error_table(code: str) -> None:
    assert f"`{code}`" in README
