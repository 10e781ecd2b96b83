"""Perplexity of a checkpoint on a text, the way quantization papers report it.

Protocol ("GPTQ-style"): tokenize the whole text with the tokenizer's default special tokens, cut
the ids into non-overlapping windows of ``seqlen`` tokens, drop the remainder, and report
exp(mean next-token negative log-likelihood) over every predicted position of every window.
Perplexities at different ``seqlen`` are not comparable, so the token count and ``seqlen`` are
always printed with the number.

    python eval.py --ckpt smollm2-135m --text wikitext2 --seqlen 2048
"""

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptq import gptq_model
from fptquant import METHODS, QuantConfig, QuantizedModel, load_quantizers, named_quantizers
from model import (DEFAULT_CHECKPOINT, REPO_DIR, UserError, load_config, load_model, load_tokenizer,
                   resolve_checkpoint)

log = logging.getLogger("fptquant")

DATA_DIR = REPO_DIR / "data"
TEXTS = {
    "wikitext2": "wikitext-2-raw-test.txt",
    "prideprejudice": "austen_prideprejudice.txt",
    "emma": "austen_emma.txt",
    "sensesensibility": "austen_sensesensibility.txt",
    "persuasion": "austen_persuasion.txt",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_text(name_or_path: str) -> str:
    """Return the contents of a named text in ``data/`` or of a UTF-8 file."""
    path = DATA_DIR / TEXTS[name_or_path] if name_or_path in TEXTS else Path(name_or_path)
    if not path.is_file():
        raise UserError(f"text {name_or_path!r} not found: give a path to a UTF-8 file or one of "
                        f"{', '.join(TEXTS)}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not valid UTF-8 ({err}); convert it to UTF-8 first")


CALIBRATION_TEXTS = ("prideprejudice", "emma", "sensesensibility")
EVALUATION_ONLY = ("wikitext2", "persuasion")


def tokenize_text(tokenizer, name_or_path: str, max_tokens: int | None = None) -> torch.Tensor:
    """Return the token ids (1-D int64) of a whole text, optionally only the first ``max_tokens``."""
    ids = torch.tensor(tokenizer.encode(read_text(name_or_path)).ids, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def calibration_windows(tokenizer, texts, n_tokens: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Return n_tokens // seqlen non-overlapping windows (N, seqlen) drawn at random from ``texts``."""
    for name in texts:
        if name in EVALUATION_ONLY:
            raise UserError(f"{name!r} is an evaluation text and is never used for calibration or training; "
                            f"use {', '.join(CALIBRATION_TEXTS)} or your own files")
    windows = []
    for name in texts:
        ids = tokenize_text(tokenizer, name)
        usable = ids.numel() // seqlen * seqlen
        windows.extend(ids[:usable].view(-1, seqlen))                  # whole windows only
    wanted = n_tokens // seqlen
    if wanted == 0:
        raise UserError(f"--calib-tokens {n_tokens} is less than one window of --seqlen {seqlen}")
    if len(windows) < wanted:
        raise UserError(f"the calibration texts {', '.join(texts)} hold {len(windows)} windows of {seqlen} "
                        f"tokens, fewer than the {wanted} that --calib-tokens {n_tokens} asks for")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:wanted]
    return torch.stack([windows[i] for i in order.tolist()])


class Progress:
    """Log ``done/total`` with rate and ETA at most every ``every`` seconds."""

    def __init__(self, label: str, total: int, unit: str = "it", every: float = 10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/{self.unit.rstrip('s')}"
        log.info("%s %d/%d %s, %s, ETA %s%s", self.label, done, self.total, self.unit, speed,
                 format_seconds(eta), f", {extra}" if extra else "")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, label: str = "perplexity") -> dict:
    """Return {"ppl", "tokens", "seqlen"} for ids cut into non-overlapping windows of seqlen."""
    windows = ids.numel() // seqlen
    if windows == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                        "use a longer text or a smaller --seqlen")
    device = next(model.parameters()).device
    batches = ids[: windows * seqlen].view(windows, seqlen)
    progress = Progress(label, windows * seqlen, unit="tokens")
    nll_sum = 0.0
    for i, window in enumerate(batches):
        window = window.unsqueeze(0).to(device)                         # (1, T)
        logits = model(window)[0, :-1].float()                          # (T-1, V)
        nll_sum += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        progress.update((i + 1) * seqlen)
    mean_nll = nll_sum / (windows * (seqlen - 1))
    return {"ppl": math.exp(mean_nll), "tokens": windows * seqlen, "seqlen": seqlen}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def run_cli(main) -> None:
    """Run ``main()``, turning a UserError into a one-line message and exit status 2."""
    setup_logging()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose and load a checkpoint (shared by eval.py and train.py)."""
    parser.add_argument("--ckpt", default=DEFAULT_CHECKPOINT,
                        help="Hugging Face folder, or NAME for checkpoints/NAME/ "
                             f"(default {DEFAULT_CHECKPOINT}, fetched on first use)")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")


def compute_dtype(args) -> torch.dtype:
    if args.dtype is not None:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested, but torch sees no CUDA device; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")


def check_seqlen(ckpt: str, seqlen: int) -> None:
    context = load_config(resolve_checkpoint(ckpt)).max_position_embeddings
    if seqlen > context:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({context} tokens)")


def quant_config(args) -> QuantConfig | None:
    """Return the quantization configuration that --config and the --*bits overrides choose."""
    if args.config is None:
        if any(b is not None for b in (args.wbits, args.abits, args.kvbits)):
            raise UserError("--wbits/--abits/--kvbits override --config; give --config too, e.g. --config W4A4KV4")
        return None
    try:
        return QuantConfig.from_name(args.config).with_overrides(args.wbits, args.abits, args.kvbits)
    except ValueError as err:
        raise UserError(str(err))


def add_quant_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """Add the flags that choose the quantization and its calibration (shared with train.py)."""
    parser.add_argument("--config", default=default_config,
                        help="quantization: W<bits>A<bits>KV<bits>, e.g. W4A4KV4, W4A8KV8, W4A16KV16, W8A8KV8"
                             + ("" if default_config else " (default: none, evaluate in floating point)"))
    for flag, what in (("--wbits", "weights"), ("--abits", "activations"), ("--kvbits", "KV cache")):
        parser.add_argument(flag, type=int, default=None, help=f"override the bits of the {what} (2..8, or 16)")
    parser.add_argument("--calib-text", nargs="+", default=list(CALIBRATION_TEXTS),
                        help="calibration texts: names or paths (default: the three Austen training novels)")
    parser.add_argument("--calib-tokens", type=positive_int, default=16384,
                        help="calibration tokens for the activation ranges (default 16384)")
    parser.add_argument("--range-method", choices=("search", "minmax"), default="search",
                        help="range initialisation: clipping search minimising the L_p error, or min-max")
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration windows and transform init")
    parser.add_argument("--weights", choices=("rtn", "gptq"), default="rtn",
                        help="weight rounding after the merge: round-to-nearest, or GPTQ on the calibration windows")
    parser.add_argument("--gptq-damp", type=float, default=0.01,
                        help="GPTQ dampening, as a fraction of the mean Hessian diagonal")
    parser.add_argument("--gptq-block", type=positive_int, default=128, help="GPTQ column block size")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of decreasing Hessian diagonal")


def quantize_baseline(teacher, qconfig, method: str, calib: torch.Tensor, args) -> QuantizedModel:
    """Return a calibrated, merged quantized model with untrained transforms (RTN or rotation)."""
    student = QuantizedModel(teacher, qconfig, METHODS[method], seed=args.seed)
    log.info("%s %s: calibrating ranges on %d windows of %d tokens", method, qconfig.name, *calib.shape)
    student.calibrate(calib.to(args.device), args.range_method,
                      progress=Progress(f"{method} calibration", calib.shape[0], unit="windows"))
    student.merge()
    if args.weights == "gptq":
        apply_gptq(student, calib, args)
    return student


def apply_gptq(student, calib: torch.Tensor, args) -> dict:
    """Replace the merged model's weights by GPTQ weights; return the settings and the time taken.

    ``student`` is a merged ``QuantizedModel`` or a Llama loaded from a merged checkpoint.
    """
    start = time.perf_counter()
    try:
        settings = gptq_model(student, calib.to(args.device), block_size=args.gptq_block, damp=args.gptq_damp,
                              act_order=args.act_order)
    except ValueError as err:
        raise UserError(str(err))
    settings["seconds"] = round(time.perf_counter() - start, 1)
    log.info("GPTQ finished in %s", format_seconds(settings["seconds"]))
    return settings


@torch.no_grad()
def activation_stats(teacher, ids: torch.Tensor, seqlen: int, method: str) -> dict[str, dict]:
    """Return max |x| and kurtosis of every tensor that W4A4KV4 quantizes, with ``method``'s transforms at init.

    Kurtosis is E[(x - mean)^4] / var^2 over all elements (3 for a Gaussian); outliers raise it.
    """
    student = QuantizedModel(teacher, QuantConfig.from_name("W4A4KV4"), METHODS[method])
    for quantizer in named_quantizers(student.model, weights=True).values():
        quantizer.enabled = False
    stats, hooks = {}, []
    for name, quantizer in named_quantizers(student.model, weights=False).items():
        quantizer.enabled = False

        def record(_, inputs, name=name):
            x = inputs[0].double().flatten()
            centred = x - x.mean()
            entry = stats.setdefault(name, {"max_abs": 0.0, "moments": torch.zeros(2, dtype=torch.float64)})
            entry["max_abs"] = max(entry["max_abs"], x.abs().max().item())
            entry["moments"] += torch.stack([centred.pow(2).mean(), centred.pow(4).mean()])

        hooks.append(quantizer.register_forward_pre_hook(record))
    for window in ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen):
        student(window[None].to(next(teacher.parameters()).device))
    for hook in hooks:
        hook.remove()
    return {name: {"max_abs": entry["max_abs"],
                   "kurtosis": (entry["moments"][1] / entry["moments"][0] ** 2 * (len(ids) // seqlen)).item()}
            for name, entry in stats.items()}


def print_activation_stats(teacher, ids: torch.Tensor, seqlen: int) -> None:
    """Print a Markdown table of activation ranges per layer, without transforms and with them at init."""
    plain = activation_stats(teacher, ids, seqlen, "rtn")
    transformed = activation_stats(teacher, ids, seqlen, "fptquant")
    print("| tensor | max abs, no transforms | max abs, FPTQuant init | kurtosis, no transforms | "
          "kurtosis, FPTQuant init |")
    print("|---|---|---|---|---|")
    for name in plain:
        short = name.replace("layers.", "").replace("self_attn.", "attn.").removesuffix("_quantizer")
        print(f"| {short} | {plain[name]['max_abs']:.1f} | {transformed[name]['max_abs']:.1f} | "
              f"{plain[name]['kurtosis']:.1f} | {transformed[name]['kurtosis']:.1f} |")


def use_int_kernels(model, folder) -> int:
    """Replace the block linears by integer ones from the folder's export; return how many."""
    from safetensors.torch import load_file

    from kernels import replace_linears_with_int

    tensors = load_file(str(Path(folder) / model.config.fptquant["quantization"]["file"]))
    try:
        return replace_linears_with_int(model, tensors)
    except ValueError as err:
        raise UserError(str(err))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--text", nargs="+", default=["wikitext2"],
                        help=f"texts to evaluate: names ({', '.join(TEXTS)}) or paths to UTF-8 files")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="use only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text on stdout")
    add_quant_args(parser, default_config=None)
    parser.add_argument("--method", choices=("rtn", "rotation"), default="rtn",
                        help="with --config: rtn (no transforms) or rotation (residual Hadamard rotation "
                             "plus the down_proj Hadamard), then the --weights rounding")
    parser.add_argument("--float", action="store_true",
                        help="evaluate a merged FPTQuant checkpoint without its quantizers")
    parser.add_argument("--kernels", choices=("fake", "int"), default="fake",
                        help="for a merged FPTQuant checkpoint: fake quantization, or real integer matmuls "
                             "(kernels.py) built from its quantized export")
    parser.add_argument("--activation-stats", action="store_true",
                        help="print max |x| and kurtosis of every quantized activation, without transforms and "
                             "with FPTQuant's at initialisation, on the first --text, instead of perplexity")
    args = parser.parse_args()

    check_device(args.device)
    check_seqlen(args.ckpt, args.seqlen)
    qconfig = quant_config(args)
    merged = "quantization" in (load_config(resolve_checkpoint(args.ckpt)).fptquant or {}) and not args.float
    if args.weights == "gptq" and qconfig is None and not merged:
        raise UserError("--weights gptq needs --config or a merged FPTQuant checkpoint, e.g. --ckpt runs/<run>/merged")
    tokenizer = load_tokenizer(args.ckpt)
    texts = {name: tokenize_text(tokenizer, name, args.max_tokens) for name in args.text}
    for name, ids in texts.items():
        if ids.numel() < args.seqlen:
            raise UserError(f"text {name!r} has {ids.numel()} tokens, fewer than one window of "
                            f"--seqlen {args.seqlen}; use a longer text or a smaller --seqlen")
    calib = (calibration_windows(tokenizer, args.calib_text, args.calib_tokens, args.seqlen, args.seed)
             if qconfig or args.weights == "gptq" else None)

    model = load_model(args.ckpt, compute_dtype(args), args.device)
    if args.activation_stats:
        name, ids = next(iter(texts.items()))
        print(f"Activation ranges on the first {ids.numel() // args.seqlen * args.seqlen} tokens of {name}, "
              f"seqlen {args.seqlen}\n")
        print_activation_stats(model, ids, args.seqlen)
        return
    label = "float"
    if qconfig is not None:
        model = quantize_baseline(model, qconfig, args.method, calib, args)
        label = f"{args.method} {qconfig.name}" + (" gptq" if args.weights == "gptq" else "")
    elif merged:
        folder = resolve_checkpoint(args.ckpt)
        label = f"fptquant {load_quantizers(model, folder).name}"
        if args.weights == "gptq":
            if args.kernels == "int":
                raise UserError("--kernels int uses the RTN weights of the quantized export; drop --weights gptq")
            apply_gptq(model, calib, args)
            label += " gptq"
        if args.kernels == "int":
            label += f", {use_int_kernels(model, folder)} integer linears"
    if args.kernels == "int" and "integer" not in label:
        raise UserError("--kernels int needs a merged FPTQuant checkpoint with its quantized export, "
                        "e.g. --ckpt runs/<run>/merged")

    for name, ids in texts.items():
        start = time.perf_counter()
        result = perplexity(model, ids, args.seqlen, label=f"{name}:")
        seconds = time.perf_counter() - start
        if args.json:
            print(json.dumps({"text": name, "model": label, **result, "seconds": round(seconds, 1)}))
        else:
            print(f"{name} ({label}): perplexity {result['ppl']:.3f} over {result['tokens']} tokens "
                  f"at seqlen {result['seqlen']} ({seconds:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
