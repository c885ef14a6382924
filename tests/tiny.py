"""Tiny models the tests build themselves: a random Llama saved as a Hugging Face folder, and the
same weights written as a GGUF file with the `gguf` library. Its vocabulary holds hostile
strings, so every test that shows tokens also shows that they stay inert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "\u202e", "\x00"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB, D_MODEL, D_MLP, LAYERS, HEADS, KV_HEADS = 512, 64, 128, 2, 4, 2

_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "She went to the market and bought apples, pears and bread.",
    "def main():\n    print('hello world')\n    return 0\n",
    "In 1999, the numbers rose from 12 to 345 and then to 6789.",
    "Ceci n'est pas une pipe. Das ist gut. ¿Dónde está la biblioteca?",
    'He said "yes" (quietly); they left at 10:30 — before the rain.',
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(HOSTILE),
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = np.random.default_rng(0)  # made-up words give the trainer enough merges to learn
    words = ["".join(rng.choice(list("aeioubcdfglmnprst"), rng.integers(2, 9))) for _ in range(3000)]
    tokenizer.train_from_iterator(_CORPUS * 50 + [" ".join(words)], trainer)
    tokenizer.add_tokens(HOSTILE)  # ordinary (not special) tokens, as data
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    return tokenizer


def build_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # give the MLP some heavy-tailed structure, as trained models have
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(5.0)
    return model


def write_folder(path: Path, seed: int = 0) -> Path:
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    build_llama(seed).save_pretrained(path, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), bos_token=SPECIAL[1], eos_token=SPECIAL[2], unk_token=None
    )
    fast.save_pretrained(path)
    return path


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rope; transformers' GGUF loader undoes this.
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(path: Path, seed: int = 0, quantization: str = "F32") -> Path:
    """The same model as write_folder(seed), as GGUF. quantization: F32, F16 or Q8_0 (MLP weights)."""
    import gguf

    model = build_llama(seed)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * VOCAB
    for token, token_id in vocab.items():
        tokens[token_id] = token
    special_ids = {vocab[t] for t in SPECIAL}
    hostile_ids = {vocab[t] for t in HOSTILE}
    types = [3 if i in special_ids else 4 if i in hostile_ids else 1 for i in range(VOCAB)]
    merges = [" ".join(pair) for pair in _merges(tokenizer)]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(D_MODEL // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, array: np.ndarray, quantize: bool = False) -> None:
        if quantize and quantization != "F32":
            qtype = gguf.GGMLQuantizationType[quantization]
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _rope_permute(state[p + "self_attn.q_proj.weight"], HEADS))
        add(f"blk.{i}.attn_k.weight", _rope_permute(state[p + "self_attn.k_proj.weight"], KV_HEADS))
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"], quantize=True)
        add(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"], quantize=True)
        add(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"], quantize=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _merges(tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
