"""A model's vocabulary and projection matrix, loaded from the store once per process.

The vocabulary (49,152 token strings for SmolLM2) lives compressed in the models table; search
needs it indexed by a normalised key, so each process decompresses and indexes it once per model
and keeps it, keyed by the model file's sha256 (a model's rows never change under one sha).
U is kept the same way, as float32, for the pages that project a vector onto the vocabulary.
"""

from __future__ import annotations

import bisect
import difflib
import json
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from channelscope.core import tables as T


def normalise(text: str) -> str:
    """The search key of a token: `Paris`, ` Paris` and `paris` share one (issue 5)."""
    return text.lstrip(" ").casefold()


@dataclass
class Vocabulary:
    tokens: list[str]
    kinds: list[str]
    keys: list[str] = field(init=False, repr=False)
    by_key: dict[str, list[int]] = field(init=False, repr=False)
    by_text: dict[str, int] = field(init=False, repr=False)
    sorted_keys: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = [normalise(t) for t in self.tokens]
        self.by_key = {}
        for token_id, key in enumerate(self.keys):
            self.by_key.setdefault(key, []).append(token_id)
        self.by_text = {t: i for i, t in enumerate(self.tokens)}
        self.sorted_keys = sorted(self.by_key)

    def __len__(self) -> int:
        return len(self.tokens)

    def find(self, text: str, exact: bool) -> list[int]:
        if exact:
            token_id = self.by_text.get(text)
            return [] if token_id is None else [token_id]
        return list(self.by_key.get(normalise(text), []))

    def suggest(self, prefix: str, limit: int) -> list[int]:
        """Token ids whose key starts with the prefix's key: whole words first (keys with a
        spelling that starts with a space, as a word inside a sentence does: ` Paris` before
        `Parc`), then shorter keys; each key by its word spelling where it has one."""
        key = normalise(prefix)
        if not key:
            return []
        start = bisect.bisect_left(self.sorted_keys, key)
        found: list[str] = []
        for candidate in self.sorted_keys[start : start + 2000]:
            if not candidate.startswith(key):
                break
            found.append(candidate)

        def word(k: str) -> int | None:
            return next((i for i in self.by_key[k] if self.tokens[i].startswith(" ")), None)

        found.sort(key=lambda k: (word(k) is None, len(k), k))
        return [word(k) if word(k) is not None else self.by_key[k][0] for k in found[:limit]]

    def close(self, text: str, limit: int) -> list[int]:
        """Tokens that look like the text, for the empty state of a search that matched nothing:
        tokens the text starts with or that start with it, then difflib's closest keys among
        those sharing its first character (difflib over all 49k keys takes a second)."""
        key = normalise(text)
        if not key:
            return []
        out: list[str] = []
        for n in range(len(key) - 1, 0, -1):  # the longest tokens that the text begins with
            if key[:n] in self.by_key:
                out.append(key[:n])
                break
        start = bisect.bisect_left(self.sorted_keys, key[0])
        same_start = []
        for candidate in self.sorted_keys[start:]:
            if not candidate.startswith(key[0]):
                break
            same_start.append(candidate)
        out += [k for k in same_start if k.startswith(key)][:limit]
        out += difflib.get_close_matches(key, same_start, n=limit, cutoff=0.6)
        seen: dict[str, None] = dict.fromkeys(k for k in out if k != key)
        return [self.by_key[k][0] for k in list(seen)[:limit]]


@dataclass
class Projection:
    """U as float32 [d_model, V] and the norms of its columns."""

    matrix: np.ndarray
    column_norms: np.ndarray

    def scored(self, kinds: list[str], quantile: float, excluded: list[int]) -> np.ndarray:
        """The tokens the worker scores (weight 1 in m0): normal tokens whose column norm is not
        above the glitch quantile (rotate.initial_token_weights), minus the tokens that the
        run's optional generic down-weighting took out. U here is the stored float16 copy, so a
        token sitting exactly on the quantile may fall on the other side of it."""
        mask = self.column_norms <= np.quantile(self.column_norms, quantile)
        mask &= np.array([kind == "normal" for kind in kinds])
        if excluded:
            mask[np.asarray(excluded, dtype=np.int64)] = False
        return mask

    def z_scores(self, vectors: np.ndarray, scored: np.ndarray) -> np.ndarray:
        """[n, d] -> [n, V]: each row's projection, standardised over the scored tokens only,
        as the worker's rotate.z_scores does."""
        z = vectors.astype(np.float32) @ self.matrix
        values = z[:, scored]
        return (z - values.mean(-1, keepdims=True)) / values.std(-1, keepdims=True).clip(1e-12)


_lock = threading.Lock()
_vocabularies: dict[str, Vocabulary] = {}
_projections: dict[tuple[str, str], Projection] = {}


def vocabulary(sha256: str, load: Callable[[], bytes]) -> Vocabulary:
    """The model's vocabulary; `load` reads the compressed blob (one query) on first use only."""
    found = _vocabularies.get(sha256)
    if found is None:
        with _lock:
            found = _vocabularies.get(sha256)
            if found is None:
                data = json.loads(zlib.decompress(load()))
                found = _vocabularies[sha256] = Vocabulary(data["tokens"], data["kinds"])
    return found


def projection(sha256: str, which: str, d_model: int, load: Callable[[], bytes]) -> Projection:
    key = (sha256, which)
    found = _projections.get(key)
    if found is None:
        with _lock:
            found = _projections.get(key)
            if found is None:
                matrix = T.unpack_compressed(load(), "float16").astype(np.float32).reshape(d_model, -1)
                found = _projections[key] = Projection(matrix, np.linalg.norm(matrix, axis=0))
    return found
