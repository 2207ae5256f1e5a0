"""Pure parts of reading token ids: the framing check, `--alias`, and the tiktoken encodings' shapes
(which must be tiktoken's own definitions: a test patches only tiktoken's file loader to read them)."""

from __future__ import annotations

import pytest
import tiktoken_ext.openai_public as openai_public

from embedserve.catalog import add_aliases, parse_alias
from embedserve.errors import ConfigError, InvalidTokenId
from embedserve.tiktoken_ids import SHAPES
from embedserve.validation import FOREIGN_IDS_HINT, check_framing
from support import bundled_folder, spec_of


@pytest.mark.parametrize("ids", [[101, 5, 102], [101, 102], [101, 7, 8, 9, 102]])
def test_framed_ids_pass(ids: list[int]) -> None:
    check_framing([ids], head=(101,), tail=(102,), shown="[CLS] (101) ... [SEP] (102)", model="m")


@pytest.mark.parametrize("ids", [[5, 102], [101, 5], [102, 101], [101], [15339, 1917]])
def test_unframed_ids_are_refused_with_the_hint(ids: list[int]) -> None:
    with pytest.raises(InvalidTokenId) as refused:
        check_framing([[101, 102], ids], head=(101,), tail=(102,), shown="<CLS> ... <SEP>", model="m")
    assert refused.value.param == "input" and "input[1]" in refused.value.message
    assert FOREIGN_IDS_HINT in refused.value.message and "<CLS> ... <SEP>" in refused.value.message


def test_an_alias_adds_a_name_and_changes_nothing_else() -> None:
    spec = spec_of(bundled_folder(), id="minilm")
    (aliased,) = add_aliases([spec], ["text-embedding-3-small=minilm"])
    assert aliased.aliases == (*spec.aliases, "text-embedding-3-small")
    assert aliased.family == spec.family and aliased.pooling == spec.pooling


@pytest.mark.parametrize("arg", ["no-equals", "=model", "name=", " = "])
def test_an_alias_must_be_name_equals_model(arg: str) -> None:
    with pytest.raises(ConfigError, match="NAME=MODEL"):
        parse_alias(arg)


def test_an_alias_to_an_unknown_model_names_the_served_ones() -> None:
    with pytest.raises(ConfigError, match="served: minilm"):
        add_aliases([spec_of(bundled_folder(), id="minilm")], ["x=nope"])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_encodings_shapes_are_tiktokens_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *_, **__: {})  # no download
    definition = getattr(openai_public, name)()
    assert SHAPES[name].pattern == definition["pat_str"]
    assert dict(SHAPES[name].special_tokens) == definition["special_tokens"]
