"""The catalog on SPLADE folders: a sentence-transformers SparseEncoder's modules (as versions 5 and 6
save them) read as pooling "splade", a bare masked LM takes it from its entry, and what would be served
differently from sentence-transformers is refused naming the file. Tiny folders, no weights: reading
a spec needs only the configuration files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedserve.catalog.compose import read_spec
from embedserve.catalog.entries import ModelEntry
from embedserve.errors import ConfigError, ModelLoadError
from embedserve.spec import ModelSpec

VOCAB = 30522
HIDDEN = 128
MLM_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": HIDDEN,
    "num_attention_heads": 2,
    "max_position_embeddings": 512,
    "vocab_size": VOCAB,
}
SPLADE_POOLING = "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"
#: The transformer module as each sentence-transformers version saves a SparseEncoder's, with its
#: sentence_bert_config.json.
TRANSFORMERS = {
    "v6 Transformer, fill-mask": (
        "sentence_transformers.base.modules.transformer.Transformer",
        {"transformer_task": "fill-mask", "module_output_name": "token_embeddings"},
    ),
    "v5 models.MLMTransformer": (
        "sentence_transformers.sparse_encoder.models.MLMTransformer",
        {"max_seq_length": 256, "do_lower_case": False},
    ),
    "v5 modules.MLMTransformer": (
        "sentence_transformers.sparse_encoder.modules.MLMTransformer",
        {"max_seq_length": 256, "do_lower_case": False},
    ),
}


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def sparse_encoder_folder(
    folder: Path,
    *,
    transformer: str = "v6 Transformer, fill-mask",
    pooling: dict[str, Any] | None = None,
    after: tuple[str, ...] = (),
    config: dict[str, Any] | None = None,
) -> Path:
    """A SparseEncoder's folder as sentence-transformers saves it (configuration files only): the
    transformer module, SpladePooling with `pooling` as its config, then the modules named in `after`."""
    kind, st_config = TRANSFORMERS[transformer]
    write_json(folder / "config.json", config or MLM_CONFIG)
    write_json(folder / "sentence_bert_config.json", st_config)
    write_json(folder / "tokenizer_config.json", {"model_max_length": 512})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": kind},
        {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": SPLADE_POOLING},
    ]
    write_json(
        folder / "1_SpladePooling" / "config.json",
        pooling if pooling is not None else {"pooling_strategy": "max", "activation_function": "relu"},
    )
    for number, module in enumerate(after, start=2):
        modules.append({"idx": number, "name": str(number), "path": f"{number}_{module}", "type": module})
        dense = {"in_features": VOCAB, "out_features": 8, "activation_function": "torch.nn.Identity"}
        write_json(folder / f"{number}_{module}" / "config.json", dense if module.endswith("Dense") else {})
    write_json(folder / "modules.json", modules)
    return folder


def bare_folder(folder: Path, config: dict[str, Any] | None = None) -> Path:
    """A transformers folder (config.json, tokenizer config) with no sentence-transformers files."""
    write_json(folder / "config.json", config or MLM_CONFIG)
    write_json(folder / "tokenizer_config.json", {"model_max_length": 512})
    return folder


def spec(folder: Path, **entry: Any) -> ModelSpec:
    return read_spec(ModelEntry(source=str(folder), id="splade", **entry), folder)


def assert_served_as_splade(served: ModelSpec) -> None:
    assert served.pooling == "splade"
    assert served.splade
    assert served.outputs == ("sparse",)
    assert served.dimensions == VOCAB  # one weight per vocabulary id
    assert served.normalize is False
    assert served.matryoshka_dimensions == ()
    assert served.heads is None
    assert served.dense == ()


@pytest.mark.parametrize("transformer", list(TRANSFORMERS))
def test_a_sparse_encoder_folder_is_served_as_splade_over_its_vocabulary(
    tmp_path: Path, transformer: str
) -> None:
    assert_served_as_splade(spec(sparse_encoder_folder(tmp_path / "m", transformer=transformer)))


def test_the_sparse_encoders_max_seq_length_limits_its_inputs(tmp_path: Path) -> None:
    served = spec(sparse_encoder_folder(tmp_path / "m", transformer="v5 models.MLMTransformer"))
    assert served.max_input_tokens == 256


def test_splade_pooling_without_a_config_takes_sentence_transformers_defaults(tmp_path: Path) -> None:
    folder = sparse_encoder_folder(tmp_path / "m", pooling={"embedding_dimension": VOCAB})
    assert_served_as_splade(spec(folder))


def test_a_bare_masked_lm_is_served_as_splade_when_its_entry_says_so(tmp_path: Path) -> None:
    served = spec(bare_folder(tmp_path / "m"), pooling="splade")
    assert_served_as_splade(served)
    assert served.max_input_tokens == 512


def test_a_bare_masked_lm_without_an_entry_pooling_stays_a_dense_model(tmp_path: Path) -> None:
    served = spec(bare_folder(tmp_path / "m"))
    assert (served.pooling, served.dimensions, served.outputs) == ("mean", HIDDEN, ("dense",))


def test_an_entry_can_pool_a_sparse_encoders_encoder_densely(tmp_path: Path) -> None:
    served = spec(sparse_encoder_folder(tmp_path / "m"), pooling="cls")
    assert (served.pooling, served.dimensions, served.outputs) == ("cls", HIDDEN, ("dense",))


def test_bge_m3_heads_beside_a_splade_model_are_not_its_outputs(tmp_path: Path) -> None:
    folder = sparse_encoder_folder(tmp_path / "m")
    for name in ("sparse_linear.pt", "colbert_linear.pt"):
        (folder / name).write_bytes(b"")
    assert_served_as_splade(spec(folder))


@pytest.mark.parametrize(
    ("pooling", "fragment"),
    [
        ({"pooling_strategy": "sum", "activation_function": "relu"}, "pooling_strategy 'sum'"),
        (
            {"pooling_strategy": "max", "activation_function": "log1p_relu"},
            "activation_function 'log1p_relu'",
        ),
        ({"activation_function": "log1p_relu"}, "activation_function 'log1p_relu'"),
    ],
)
def test_splade_pooling_other_than_max_relu_is_refused_naming_the_file(
    tmp_path: Path, pooling: dict[str, Any], fragment: str
) -> None:
    folder = sparse_encoder_folder(tmp_path / "m", pooling=pooling)
    with pytest.raises(ModelLoadError) as caught:
        spec(folder)
    message = str(caught.value)
    assert str(folder / "1_SpladePooling" / "config.json") in message
    assert fragment in message
    assert "not supported" in message


@pytest.mark.parametrize("make", ["sparse encoder", "bare"])
def test_splade_on_a_model_without_a_masked_lm_head_is_refused(tmp_path: Path, make: str) -> None:
    config = {**MLM_CONFIG, "architectures": ["BertModel"]}
    if make == "bare":
        folder, entry = bare_folder(tmp_path / "m", config), {"pooling": "splade"}
    else:
        folder, entry = sparse_encoder_folder(tmp_path / "m", config=config), {}
    with pytest.raises(ModelLoadError) as caught:
        spec(folder, **entry)
    message = str(caught.value)
    assert "model 'splade'" in message
    assert "ForMaskedLM" in message
    assert "BertModel" in message
    assert str(folder / "config.json") in message


def test_splade_without_a_vocab_size_is_refused(tmp_path: Path) -> None:
    config = {k: v for k, v in MLM_CONFIG.items() if k != "vocab_size"}
    with pytest.raises(ModelLoadError, match="has no vocab_size"):
        spec(bare_folder(tmp_path / "m", config), pooling="splade")


@pytest.mark.parametrize(
    "module",
    ["sentence_transformers.models.Normalize", "sentence_transformers.models.Dense"],
)
def test_a_module_after_splade_pooling_is_refused(tmp_path: Path, module: str) -> None:
    folder = sparse_encoder_folder(tmp_path / "m", after=(module,))
    with pytest.raises(ModelLoadError, match="after SpladePooling is not supported"):
        spec(folder)


@pytest.mark.parametrize(
    "module",
    [
        "sentence_transformers.sparse_encoder.modules.SparseStaticEmbedding",
        "sentence_transformers.sparse_encoder.modules.SparseAutoEncoder",
        "sentence_transformers.base.modules.Router",
    ],
)
def test_sparse_encoder_modules_we_do_not_compute_are_refused_by_name(tmp_path: Path, module: str) -> None:
    folder = sparse_encoder_folder(tmp_path / "m", after=(module,))
    with pytest.raises(ModelLoadError) as caught:
        spec(folder)
    assert str(folder / "modules.json") in str(caught.value)
    assert module.rsplit(".", 1)[-1] in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "key"),
    [({"normalize": True}, "normalize"), ({"matryoshka_dimensions": (64, 128)}, "matryoshka_dimensions")],
)
def test_normalize_or_matryoshka_on_a_splade_entry_is_a_config_error(
    tmp_path: Path, entry: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        spec(bare_folder(tmp_path / "m"), pooling="splade", **entry)
    assert f"{key} does not apply to pooling 'splade'" in str(caught.value)


def test_an_entry_that_turns_normalization_off_on_splade_is_accepted(tmp_path: Path) -> None:
    assert_served_as_splade(spec(bare_folder(tmp_path / "m"), pooling="splade", normalize=False))
