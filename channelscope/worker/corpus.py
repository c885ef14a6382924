"""The corpora: what texts the model is run over, and their MLP inputs.

Two corpora. The committed one (corpus/texts.jsonl, written by corpus/make_corpus.py): 320
passages SmolLM2 generated itself, for the ablation page's example prompts.
And the real one, built on each machine by `channelscope corpus build` (`build` below) from text
people wrote that ships with every Python: the prose of the Python documentation
(pydoc_data.topics), the standard library's docstrings and some of its source code, plus the
committed passages and any text files added with `channelscope corpus add`; deduplicated, cut
into documents, named by the sha256 of its manifest (the standard library differs between
Python versions, so what is computed over it names the corpus it came from). Licenses: the
Python documentation and standard library are under the PSF License; the generated passages are
SmolLM2's output (Apache-2.0 model).

What "active" means (a threshold per neuron) comes from the activation pass over this corpus
(worker/activations.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from channelscope.method.intervention import LanguageModel

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "texts.jsonl"
MAX_TOKENS = 192  # per text: the generated texts are ~100 tokens; this only guards the cost


@dataclass(frozen=True)
class Corpus:
    key: str  # sha256 prefix of the file: thresholds name the corpus they were computed on
    texts: tuple[str, ...]


@lru_cache
def load(path: Path = CORPUS) -> Corpus:
    blob = path.read_bytes()
    texts = tuple(json.loads(line)["text"] for line in blob.decode("utf-8").splitlines() if line.strip())
    return Corpus(hashlib.sha256(blob).hexdigest()[:16], texts)


# --- the real corpus -----------------------------------------------------------------------------

# Characters per source in the default build (about 4 per SmolLM2 token: ~390,000 tokens in all).
BUDGET = {"python-docs": 480_000, "docstrings": 560_000, "stdlib-source": 400_000, "generated": 140_000}
DOCUMENT_CHARS = 1_200  # a document: paragraphs up to about this many characters (~300 tokens)
USER_BUDGET = 2_000_000  # characters of added text files


def corpus_dir(data_dir: Path) -> Path:
    return data_dir / "corpus"


def _documents(text: str) -> list[str]:
    """Paragraphs packed into documents of up to DOCUMENT_CHARS characters (a longer paragraph
    is cut at line breaks, then hard)."""
    pieces: list[str] = []
    for paragraph in text.replace("\r\n", "\n").split("\n\n"):
        paragraph = paragraph.strip("\n")
        while len(paragraph) > DOCUMENT_CHARS:
            cut = paragraph.rfind("\n", 0, DOCUMENT_CHARS)
            cut = cut if cut > DOCUMENT_CHARS // 4 else DOCUMENT_CHARS
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        if paragraph.strip():
            pieces.append(paragraph)
    out, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > DOCUMENT_CHARS:
            out.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return out


def _stdlib_files() -> list[Path]:
    """The standard library's own modules, in a fixed order (no tests, no site-packages)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _sources(extra_dir: Path | None):
    """(source, text) of every text the corpus is cut from, in a fixed order."""
    import ast
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield "python-docs", pydoc_data.topics.topics[name]
    files = _stdlib_files()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # one-liners say little
                    yield "docstrings", doc
    # Source code: every 7th module, whole, so the budget spreads over the library.
    for path in files[::7]:
        try:
            yield "stdlib-source", path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    for text in load().texts:
        yield "generated", text
    if extra_dir is not None and extra_dir.exists():
        for path in sorted(extra_dir.iterdir()):
            yield "added", path.read_text(encoding="utf-8", errors="replace")


def build(data_dir: Path) -> dict:
    """Write the real corpus under data_dir/corpus (corpus.jsonl and manifest.json) and return
    the manifest. Deterministic for one Python installation and one set of added files."""
    import platform

    folder = corpus_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    budget = {**BUDGET, "added": USER_BUDGET}
    used = dict.fromkeys(budget, 0)
    seen, documents = set(), []
    for source, text in _sources(folder / "added"):
        for document in _documents(text):
            if used[source] >= budget[source]:
                break
            fingerprint = hashlib.sha256(" ".join(document.split()).encode()).digest()
            if fingerprint in seen or len(document) < 40:
                continue
            seen.add(fingerprint)
            used[source] += len(document)
            documents.append({"source": source, "text": document})
    body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
    manifest = {
        "key": hashlib.sha256(body.encode()).hexdigest()[:16],
        "documents": len(documents),
        "characters": {source: count for source, count in used.items() if count},
        "python": platform.python_version(),
        "licenses": {
            "python-docs": "PSF License", "docstrings": "PSF License", "stdlib-source": "PSF License",
            "generated": "SmolLM2's output (Apache-2.0 model)", "added": "as their files say",
        },
    }  # fmt: skip
    (folder / "corpus.jsonl").write_text(body, encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def add(data_dir: Path, path: Path) -> Path:
    """Copy a text file into the corpus's added texts (used by the next build)."""
    folder = corpus_dir(data_dir) / "added"
    folder.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8", errors="replace")
    target = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}-{path.name}"
    target.write_text(text, encoding="utf-8")
    return target


@dataclass(frozen=True)
class Built:
    key: str  # the manifest's hash: what activations name
    texts: tuple[str, ...]
    sources: tuple[str, ...]


def load_built(data_dir: Path) -> Built | None:
    """The real corpus of this machine, or None until `channelscope corpus build`."""
    folder = corpus_dir(data_dir)
    if not (folder / "manifest.json").exists():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [json.loads(line) for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    return Built(manifest["key"], tuple(r["text"] for r in rows), tuple(r["source"] for r in rows))


def ensure_built(data_dir: Path, log=print) -> Built:
    """The built corpus, building it first where there is none yet."""
    built = load_built(data_dir)
    if built is None:
        log("building the corpus first (`channelscope corpus build`)")
        build(data_dir)
        built = load_built(data_dir)
    return built


def encode(
    lm: LanguageModel, texts: tuple[str, ...] | list[str], max_tokens: int = MAX_TOKENS
) -> list[list[int]]:
    return [lm.encode(text)[:max_tokens] for text in texts]


@lru_cache(maxsize=1)
def _trigrams() -> dict[str, frozenset[int]]:
    """Which corpus texts hold each 3-character string (built once, ~0.1 s)."""
    index: dict[str, set[int]] = {}
    for i, text in enumerate(load().texts):
        for j in range(len(text) - 2):
            index.setdefault(text[j : j + 3], set()).add(i)
    return {gram: frozenset(ids) for gram, ids in index.items()}


@lru_cache(maxsize=65536)
def texts_containing(word: str) -> tuple[int, ...]:
    """The corpus texts a token string occurs in: only texts that hold all of its trigrams are
    read, so the ablation page's example prompts cost a few set intersections instead of corpus scans."""
    texts, index = load().texts, _trigrams()
    grams = [index.get(word[j : j + 3], frozenset()) for j in range(len(word) - 2)]
    candidates = sorted(frozenset.intersection(*grams)) if grams else range(len(texts))
    return tuple(i for i in candidates if word in texts[i])


def padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of token sequences as ids [B, T], padded on the right (where causal attention
    never lets padding reach a real position), and the mask of real positions [B, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return ids, mask


@torch.inference_mode()
def layer_inputs(lm: LanguageModel, sequences: list[list[int]], layers: list[int], batch_size: int = 8):
    """One pass over the token sequences, keeping the MLP's input x [N, d] at each of `layers`.
    N counts real (unpadded) positions, sequence after sequence (batches from `padded`)."""
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    mask_now: dict[str, torch.Tensor] = {}

    def keeper(layer: int):
        def hook(_module, args):
            kept[layer].append(args[0][mask_now["mask"]].clone())  # [n real positions, d]

        return hook

    for layer in layers:
        handles.append(lm.mlp(layer).register_forward_pre_hook(keeper(layer)))
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = padded(sequences[start : start + batch_size])
            mask_now["mask"] = mask.to(lm.device)
            lm.model.base_model(
                input_ids=ids.to(lm.device), attention_mask=mask.long().to(lm.device), use_cache=False
            )
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts).cpu() for layer, parts in kept.items()}
