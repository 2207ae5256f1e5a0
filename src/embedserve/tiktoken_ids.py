"""Token ids of OpenAI's tokenizers (tiktoken's `cl100k_base`, `o200k_base`), read back into the text
they came from for a model that opts in; the encoding is found offline, never downloaded (design note 34)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedserve.errors import ConfigError, InvalidTokenId
from embedserve.types import TiktokenName

if TYPE_CHECKING:
    import tiktoken

_BLOBS = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


@dataclass(frozen=True, slots=True)
class EncodingShape:
    """What defines an encoding besides its ranks: its split pattern and special tokens (as tiktoken's
    own definitions in tiktoken_ext.openai_public give them; a test holds the two together)."""

    pattern: str
    special_tokens: Mapping[str, int]


SHAPES: Mapping[TiktokenName, EncodingShape] = {
    "cl100k_base": EncodingShape(
        pattern=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": EncodingShape(
        pattern="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}


def cache_path(name: str) -> Path:
    """Where tiktoken keeps the encoding's file once downloaded: its cache (TIKTOKEN_CACHE_DIR, or
    DATA_GYM_CACHE_DIR, or the temporary directory's data-gym-cache), under the SHA-1 of its URL."""
    folder = (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    return Path(folder) / hashlib.sha1(_BLOBS.format(name=name).encode()).hexdigest()


def locate(name: str, file: Path | None) -> Path:
    """The file the encoding's ranks are read from, or ConfigError (one line, at start)."""
    path = file if file is not None else cache_path(name)
    if not path.is_file():
        where = f"the file {file}" if file is not None else f"tiktoken's cache ({path})"
        raise ConfigError(
            f"tiktoken encoding {name!r} not found in {where}: copy {name}.tiktoken there "
            "(tiktoken's cache: TIKTOKEN_CACHE_DIR), or name the file with --tiktoken-file"
        )
    return path


def load(name: TiktokenName, file: Path | None) -> tiktoken.Encoding:
    """Blocking: the encoding, from `file` (a .tiktoken ranks file) or tiktoken's cache."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    shape = SHAPES[name]
    try:
        ranks = load_tiktoken_bpe(str(locate(name, file)))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tiktoken encoding {name!r}: cannot read its file: {exc}") from None
    return tiktoken.Encoding(
        name, pat_str=shape.pattern, mergeable_ranks=ranks, special_tokens=dict(shape.special_tokens)
    )


def decode(encoding: tiktoken.Encoding, arrays: Sequence[Sequence[int]]) -> list[str]:
    """Each id array back to its text; an id the encoding does not have is a 400 naming it."""
    texts = []
    for i, ids in enumerate(arrays):
        try:
            texts.append(encoding.decode(list(ids), errors="replace"))
        except KeyError:  # an id past the encoding, or in a gap of its ranks
            bad = next(t for t in ids if not _known(encoding, t))
            raise InvalidTokenId(
                f"input[{i}] holds token id {bad}, which is neither the model's nor {encoding.name}'s.",
                param="input",
            ) from None
    return texts


def _known(encoding: tiktoken.Encoding, token: int) -> bool:
    try:
        encoding.decode_single_token_bytes(token)
    except KeyError:
        return False
    return True
