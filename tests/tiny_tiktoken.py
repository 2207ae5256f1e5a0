"""A small tiktoken encoding trained here (byte-level BPE with cl100k_base's split pattern and special
tokens, a few hundred merges learnt from the tiny models' corpus), written as a `.tiktoken` ranks file:
what a client such as LangChain makes token ids with, without downloading OpenAI's files."""

from __future__ import annotations

import base64
import collections
import itertools
from pathlib import Path

import regex
import tiktoken

from embedserve.tiktoken_ids import SHAPES
from tiny_models import training_corpus

MERGES = 300


def build_encoding(path: Path, merges: int = MERGES) -> tiktoken.Encoding:
    """Train, write `path` (the ranks file the server reads) and return the client's Encoding."""
    shape = SHAPES["cl100k_base"]
    words = collections.Counter(
        piece.encode() for line in training_corpus() for piece in regex.findall(shape.pattern, line)
    )
    ranks = {bytes([b]): b for b in range(256)}
    split = {word: [bytes([b]) for b in word] for word in words}
    for _ in range(merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, parts in split.items():
            for a, b in itertools.pairwise(parts):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for word, parts in split.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[word] = out
    path.write_text(
        "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()),
        encoding="ascii",
    )
    # Special tokens keep cl100k_base's ids, past a gap: ids in the gap belong to no token.
    return tiktoken.Encoding(
        "cl100k_base", pat_str=shape.pattern, mergeable_ranks=ranks, special_tokens=dict(shape.special_tokens)
    )
