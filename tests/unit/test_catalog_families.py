"""The catalog applies the family presets over the folder's own files, under the entry's overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from embedserve.catalog.entries import load_models_file
from embedserve.catalog.families import QWEN3_DEFAULT_TASK
from embedserve.errors import ConfigError
from support import spec_of

XLMR_CONFIG = {
    "model_type": "xlm-roberta",
    "architectures": ["XLMRobertaModel"],
    "hidden_size": 1024,
    "max_position_embeddings": 8194,
    "pad_token_id": 1,
}
QWEN3_CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 1024,
    "max_position_embeddings": 32768,
}
QWEN3_QUERY = f"Instruct: {QWEN3_DEFAULT_TASK}\nQuery:"


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def model_folder(
    folder: Path,
    config: dict[str, Any],
    *,
    modules: list[dict[str, Any]] | None = None,
    pooling: dict[str, Any] | None = None,
    st_config: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """Config files only (read_spec loads no weights); an empty weights file satisfies locate()."""
    write_json(folder / "config.json", config)
    (folder / "model.safetensors").write_bytes(b"")
    write_json(folder / "tokenizer_config.json", tokenizer_config or {"model_max_length": 131072})
    if modules is not None:
        write_json(folder / "modules.json", modules)
    if pooling is not None:
        write_json(folder / "1_Pooling" / "config.json", pooling)
    if st_config is not None:
        write_json(folder / "config_sentence_transformers.json", st_config)
    return folder


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}


def test_bare_bge_m3_folder_gets_cls_normalized_8192_and_both_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        spec = spec_of(model_folder(tmp_path / "bge-m3", XLMR_CONFIG))
    assert (spec.family, spec.pooling, spec.normalize) == ("bge-m3", "cls", True)
    assert (spec.max_input_tokens, spec.dimensions, spec.matryoshka_dimensions) == (8192, 1024, ())
    assert (spec.id, spec.aliases) == ("bge-m3", ("BAAI/bge-m3",))
    assert spec.padding_side == "right" and spec.eos_token is None and spec.query_template is None
    assert "mean pooling" not in caplog.text  # the preset, not the plain-transformers fallback


def test_qwen3_folder_gets_last_token_left_padding_eos_and_its_dimension_list(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "Qwen3-Embedding-0.6B",
        QWEN3_CONFIG,
        st_config={"prompts": {"query": QWEN3_QUERY, "document": ""}, "default_prompt_name": None},
    )
    spec = spec_of(folder)
    assert (spec.family, spec.pooling, spec.normalize, spec.padding_side) == (
        "qwen3-embedding",
        "last_token",
        True,
        "left",
    )
    assert spec.max_input_tokens == 32768
    assert spec.matryoshka_dimensions == (64, 128, 256, 512, 768, 1024)
    assert spec.eos_token == "<|endoftext|>"
    assert spec.query_template == "Instruct: {instruction}\nQuery:"
    assert spec.default_instruction == QWEN3_DEFAULT_TASK
    assert (spec.id, spec.aliases) == ("Qwen3-Embedding-0.6B", ("Qwen/Qwen3-Embedding-0.6B",))
    assert spec.input_types == ["query", "document"]


def test_preset_wins_over_files_that_disagree(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "bge-m3",
        XLMR_CONFIG,
        modules=[TRANSFORMER, POOLING],
        pooling={"pooling_mode_mean_tokens": True},
        tokenizer_config={"padding_side": "left", "model_max_length": 8192},
    )
    spec = spec_of(folder)
    assert (spec.pooling, spec.normalize, spec.padding_side) == ("cls", True, "right")


def test_entry_overrides_win_over_the_preset(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "Qwen3-Embedding-0.6B", QWEN3_CONFIG)
    spec = spec_of(
        folder,
        id="qwen",
        pooling="mean",
        max_input_tokens=8192,
        matryoshka_dimensions=(128, 1024),
        instruction="Find code",
        query_template="Task: {instruction}\nQ: ",
    )
    assert (spec.id, spec.aliases) == ("qwen", ())  # an explicit id gets no automatic aliases
    assert (spec.pooling, spec.max_input_tokens, spec.matryoshka_dimensions) == ("mean", 8192, (128, 1024))
    assert (spec.query_template, spec.default_instruction) == ("Task: {instruction}\nQ: ", "Find code")


def test_a_custom_task_in_the_folders_query_prompt_becomes_the_default_instruction(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "Qwen3-Embedding-4B",
        {**QWEN3_CONFIG, "hidden_size": 2560},
        st_config={"prompts": {"query": "Instruct: Find code\nQuery:"}},
    )
    spec = spec_of(folder)
    assert spec.default_instruction == "Find code"
    assert spec.matryoshka_dimensions == (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560)


def test_explicit_family_serves_a_fine_tune_with_another_name(tmp_path: Path) -> None:
    spec = spec_of(model_folder(tmp_path / "my-retriever", QWEN3_CONFIG), family="qwen3-embedding")
    assert spec.family == "qwen3-embedding" and spec.pooling == "last_token"
    assert spec.aliases == ()


def test_family_none_switches_the_preset_off(tmp_path: Path) -> None:
    spec = spec_of(model_folder(tmp_path / "bge-m3", XLMR_CONFIG), family="none")
    assert spec.family is None and spec.pooling == "mean"  # the plain-transformers fallback


def test_name_with_another_architecture_gets_no_preset_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bert = {"model_type": "bert", "hidden_size": 384, "max_position_embeddings": 512}
    with caplog.at_level(logging.WARNING, logger="embedserve.catalog"):
        spec = spec_of(model_folder(tmp_path / "bge-m3", bert))
    assert spec.family is None
    assert "named like bge-m3 but config.json has model_type 'bert'" in caplog.text


def test_explicit_family_with_another_architecture_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_type 'xlm-roberta', not qwen3"):
        spec_of(model_folder(tmp_path / "m", XLMR_CONFIG), family="qwen3-embedding")


def test_instruction_on_a_model_without_a_template_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a query_template"):
        spec_of(model_folder(tmp_path / "bge-m3", XLMR_CONFIG), instruction="Find code")


def test_default_prompt_name_must_name_a_prompt(tmp_path: Path) -> None:
    folder = model_folder(
        tmp_path / "e5",
        {**XLMR_CONFIG, "max_position_embeddings": 514},
        st_config={"prompts": {"query": "query: "}, "default_prompt_name": "passage"},
    )
    with pytest.raises(ConfigError, match="default_prompt_name 'passage' is not one of its prompts"):
        spec_of(folder)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('family = "bert"', 'family: "bert" is not one of auto, none, bge-m3, qwen3-embedding'),
        ('query_template = "Query: "', "query_template: must contain {instruction}"),
        ('instruction = ""', 'instruction: must be a non-empty string, got ""'),
        ("instruction = 3", "instruction: must be a non-empty string, got 3"),
        ("prompts = { query = 1 }", 'prompts: must be a table of strings (name = prompt), got {"query": 1}'),
    ],
)
def test_bad_family_keys_in_the_models_file_are_config_errors(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nsource = "x"\n{line}\n')
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert info.value.message == f'models file {path}, model #1 ("x"): {message}'


def test_family_keys_in_the_models_file_reach_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nsource = "x"\nfamily = "qwen3-embedding"\ninstruction = "Find code"\n'
        'query_template = "Task: {instruction}\\nQ: "\n'
    )
    (entry,) = load_models_file(path)
    assert (entry.family, entry.instruction, entry.query_template) == (
        "qwen3-embedding",
        "Find code",
        "Task: {instruction}\nQ: ",
    )
