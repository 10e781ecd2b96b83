"""The main job: quantize a checkpoint with FPTQuant, then evaluate and save it.

Phases:
1. local: train the transforms so that the tensors to be quantized (merged weights and, with
   --local-loss both, the activations at the quantizer inputs) have small L4 norms;
2. calibrate: set every quantizer's range by a clipping search on calibration windows;
3. end-to-end: train the transforms and the quantizers' scales and zero points so that the
   quantized student matches the full-precision teacher's next-token distributions
   (Jensen-Shannon divergence);
4. merge the transforms into the weights and check that the merged model reproduces the
   unmerged one;
5. evaluate full precision and quantized on the evaluation texts, and save.

    python train.py                                  # SmolLM2-135M at W4A4KV4, every transform
    python train.py --ckpt llama-7b --device cuda    # any Hugging Face Llama folder
"""

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from eval import (CALIBRATION_TEXTS, EVALUATION_ONLY, Progress, add_model_args, add_quant_args,
                  calibration_windows, check_device, check_seqlen, compute_dtype, format_seconds,
                  apply_gptq, perplexity, positive_int, quant_config, quantize_baseline, run_cli,
                  tokenize_text)
from fptquant import (METHODS, QUANTIZED_FILE, TRANSFORM_NAMES, QuantizedModel, export_quantized,
                      named_quantizers)
from model import UserError, load_model, load_tokenizer, replace_dir, resolve_checkpoint, save_checkpoint

log = logging.getLogger("fptquant")

ABLATION_FLAGS = {"rotation": "--no-rotation", "tk": "--no-tk", "tv": "--no-tv", "tu": "--no-tu",
                  "hadamard": "--no-hadamard", "sn": "--no-sn"}


# Defaults that --preset sets. Flags given on the command line override them. "quick" keeps the
# defaults of parse_args (21 minutes for SmolLM2-135M on two CPU cores, see BENCHMARKS.md).
# NOTE: "large" is an estimate for a 7B model on one GPU and has not been run.
PRESETS = {
    "quick": {},
    "large": {"seqlen": 2048, "calib_tokens": 131072, "local_steps": 200, "e2e_steps": 100, "e2e_batch": 4,
              "weights": "gptq"},
}


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the message names the step and the last checkpoint."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(seqlen=512)
    add_quant_args(parser, default_config="W4A4KV4")
    parser.add_argument("--eval-text", nargs="+", default=list(EVALUATION_ONLY),
                        help="evaluation texts: names or paths (never trained on)")
    parser.add_argument("--eval-tokens", type=positive_int, default=16384,
                        help="evaluate on the first N tokens of each text")
    parser.add_argument("--eval-seqlen", type=positive_int, default=2048,
                        help="window length for evaluation (--seqlen sets the calibration and training windows)")
    parser.add_argument("--local-steps", type=int, default=50, help="steps of the local (L4) phase")
    parser.add_argument("--local-lr", type=float, default=1e-2, help="AdamW learning rate of the local phase")
    parser.add_argument("--local-loss", choices=("weights", "activations", "both"), default="both",
                        help="tensors whose L4 norm the local phase minimises")
    parser.add_argument("--local-batch", type=positive_int, default=1,
                        help="calibration windows per local step (activation loss)")
    parser.add_argument("--e2e-steps", type=int, default=30, help="steps of the end-to-end phase")
    parser.add_argument("--e2e-lr", type=float, default=1e-3,
                        help="peak AdamW learning rate of the transforms in the end-to-end phase")
    parser.add_argument("--quantizer-lr", type=float, default=1e-4,
                        help="peak learning rate of the quantizer scales and zero points")
    parser.add_argument("--e2e-batch", type=positive_int, default=2, help="windows per end-to-end step")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of end-to-end steps of linear warmup")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/<ckpt>-<config>-<time>)")
    parser.add_argument("--save-every", type=positive_int, default=10, help="checkpoint every N steps")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue the run in this output folder from its last checkpoint")
    parser.add_argument("--compare", action="store_true",
                        help="also evaluate RTN, rotation only and FPTQuant after the local phase")
    for name, flag in ABLATION_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=f"switch off the {name} transform")
    parser.add_argument("--preset", choices=PRESETS, default="quick",
                        help="quick: the defaults shown here, with RTN weights. large (for a GPU): 2048-token windows, "
                             "131072 calibration tokens, 200 local and 100 end-to-end steps of 4 windows, GPTQ "
                             "weights. Flags given explicitly override the preset")
    parser.set_defaults(**PRESETS[parser.parse_known_args(argv)[0].preset])
    return parser.parse_args(argv)


def enabled_transforms(args) -> tuple[str, ...]:
    return tuple(name for name in TRANSFORM_NAMES if not getattr(args, ABLATION_FLAGS[name][2:].replace("-", "_")))


# ----------------------------------------------------------------------------------------------
# Losses


def l4_norm(t: torch.Tensor) -> torch.Tensor:
    """mean(|t|^4)^(1/4), computed in float32."""
    return t.float().pow(4).mean().pow(0.25)


def jensen_shannon(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of JSD(p_teacher, p_student) in nats."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm).mean()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_state(path: Path, student: QuantizedModel, phase: str, step: int, optimizer, scheduler) -> None:
    """Write the training state atomically (a temporary file renamed into place)."""
    state = {"phase": phase, "step": step,
             "transforms": student.transforms.state_dict(),
             "quantizers": {k: v for k, v in student.model.state_dict().items() if "quantizer" in k},
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, student: QuantizedModel) -> dict:
    state = torch.load(path, map_location=next(student.parameters()).device, weights_only=False)
    student.transforms.load_state_dict(state["transforms"])
    student.model.load_state_dict(state["quantizers"], strict=False)
    return state


def window_batch(windows: torch.Tensor, step: int, batch: int, seed: int) -> torch.Tensor:
    """Return the windows of one step: a fixed shuffle per epoch, so a resumed run gets the same data."""
    per_epoch = max(windows.shape[0] // batch, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return windows[order[index * batch:(index + 1) * batch]]


def check_finite(loss: torch.Tensor, phase: str, step: int, checkpoint: Path) -> None:
    if not torch.isfinite(loss):
        last = f"last good checkpoint: {checkpoint}" if checkpoint.exists() else "no checkpoint was written yet"
        raise TrainingError(f"the {phase} loss became {loss.item()} at step {step}; {last}. Lower the learning "
                            "rate or resume from the checkpoint with --resume")


# ----------------------------------------------------------------------------------------------
# Phases


def local_phase(student: QuantizedModel, windows, args, checkpoint: Path, start=None) -> list[float]:
    """Minimise the L4 norms of the weights and activations that will be quantized; return the losses."""
    quantizers = list(named_quantizers(student.model, True).values()) + \
        list(named_quantizers(student.model, False).values())
    for quantizer in quantizers:
        quantizer.enabled = False
    activations = []
    hooks = []
    if args.local_loss in ("activations", "both"):
        for quantizer in named_quantizers(student.model, False).values():
            hooks.append(quantizer.register_forward_pre_hook(lambda _, inputs: activations.append(l4_norm(inputs[0]))))

    optimizer = torch.optim.AdamW(student.transforms.parameters(), lr=args.local_lr, weight_decay=0)
    first_step = 0
    if start is not None and start["phase"] == "local":
        optimizer.load_state_dict(start["optimizer"])
        first_step = start["step"]
    weight_names = [n.removesuffix("weight_quantizer") + "weight" for n in named_quantizers(student.model, True)]
    reference = None
    losses = []
    progress = Progress("local", args.local_steps, unit="steps", every=5)
    for step in range(first_step, args.local_steps):
        batch = window_batch(windows, step, args.local_batch, args.seed).to(args.device)
        activations.clear()
        with parametrize.cached():
            weights = student.weights()
            terms = [l4_norm(weights[name]) for name in weight_names] if args.local_loss != "activations" else []
            if args.local_loss != "weights":
                student(batch)
                terms += activations
        terms = torch.stack(terms)
        if reference is None:  # each tensor's L4 norm relative to its value at the start
            reference = terms.detach().clamp(min=1e-12)
        loss = (terms / reference).mean()
        check_finite(loss, "local", step, checkpoint)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.update(step + 1, f"loss {loss.item():.4f}, lr {args.local_lr:.1e}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.local_steps:
            save_state(checkpoint, student, "local", step + 1, optimizer, None)

    for hook in hooks:
        hook.remove()
    for quantizer in quantizers:
        quantizer.enabled = True
    return losses


def e2e_phase(student: QuantizedModel, teacher, windows, args, checkpoint: Path, start=None) -> list[float]:
    """Train transforms and quantizer ranges to match the teacher (Jensen-Shannon); return the losses."""
    quantizer_params = [p for n, p in student.model.named_parameters() if "quantizer" in n]
    optimizer = torch.optim.AdamW([
        {"params": list(student.transforms.parameters()), "lr": args.e2e_lr},
        {"params": quantizer_params, "lr": args.quantizer_lr},
    ], weight_decay=0)
    warmup = max(int(args.warmup * args.e2e_steps), 1)

    def schedule(step):  # linear warmup, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.e2e_steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    first_step = 0
    if start is not None and start["phase"] == "e2e":
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        first_step = start["step"]

    progress = Progress("e2e", args.e2e_steps, unit="steps", every=5)
    losses = []
    step_start = time.perf_counter()
    for step in range(first_step, args.e2e_steps):
        batch = window_batch(windows, step, args.e2e_batch, args.seed).to(args.device)
        with torch.no_grad():
            target = teacher(batch)
        loss = jensen_shannon(student(batch), target)
        check_finite(loss, "e2e", step, checkpoint)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        now = time.perf_counter()
        tokens_per_s = batch.numel() / (now - step_start)
        step_start = now
        progress.update(step + 1, f"JSD {loss.item():.5f}, lr {lr:.2e}, {tokens_per_s:.0f} tokens/s")
        if (step + 1) % args.save_every == 0 or step + 1 == args.e2e_steps:
            save_state(checkpoint, student, "e2e", step + 1, optimizer, scheduler)
    return losses


# ----------------------------------------------------------------------------------------------
# Evaluation and output


def evaluate(model, texts: dict, seqlen: int, method: str, results: dict) -> None:
    for name, ids in texts.items():
        result = perplexity(model, ids, seqlen, label=f"eval {method} {name}:")
        log.info("%s on %s: perplexity %.3f over %d tokens at seqlen %d", method, name, result["ppl"],
                 result["tokens"], seqlen)
        results.setdefault(method, {})[name] = result


def results_table(results: dict) -> str:
    texts = list(results["float"])
    lines = ["| method | " + " | ".join(f"{t} ppl | x float" for t in texts) + " |",
             "|---|" + "---|---|" * len(texts)]
    for method, per_text in results.items():
        cells = []
        for text in texts:
            ppl = per_text[text]["ppl"]
            cells.append(f"{ppl:.2f} | {ppl / results['float'][text]['ppl']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    first = results["float"][texts[0]]
    lines.append(f"\n(first {first['tokens']} tokens of each text, seqlen {first['seqlen']})")
    return "\n".join(lines)


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def peak_memory(device: str) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
    text = f"peak CPU memory (max RSS) {rss:.2f} GiB"
    if device.startswith("cuda"):
        text += f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def prepare_output(args) -> Path:
    """Return the output folder; for --resume, reload the run's saved arguments."""
    if args.resume is not None:
        return args.resume
    if args.out is None:
        name = Path(args.ckpt).name
        args.out = Path("runs") / f"{name}-{quant_config(args).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"output folder {args.out} exists and is not empty; choose another --out, "
                        "or --resume it")
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out / "args.json", saved)
    return args.out


def resumed_args(argv) -> argparse.Namespace:
    """Parse the command line; with --resume, take every setting but --resume from the run's args.json."""
    args = parse_args(argv)
    if args.resume is None:
        return args
    saved_path = args.resume / "args.json"
    if not saved_path.is_file():
        raise UserError(f"cannot resume: {saved_path} not found; --resume takes the output folder of a run")
    saved = json.loads(saved_path.read_text())
    resumed = parse_args([])
    for key, value in saved.items():
        setattr(resumed, key, Path(value) if key in ("out",) and value is not None else value)
    resumed.resume = args.resume
    return resumed


def add_log_file(folder: Path) -> None:
    handler = logging.FileHandler(folder / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)


def validate(args) -> None:
    """Reject bad settings before any work starts."""
    check_device(args.device)
    quant_config(args)
    check_seqlen(args.ckpt, max(args.seqlen, args.eval_seqlen))
    for flag in ("local_steps", "e2e_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    for name in args.calib_text:
        if name in args.eval_text:
            raise UserError(f"{name!r} is both a calibration and an evaluation text; keep them apart")


def main(argv=None) -> dict:
    args = resumed_args(argv)
    validate(args)
    qconfig = quant_config(args)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.ckpt)
    calib = calibration_windows(tokenizer, args.calib_text, args.calib_tokens, args.seqlen, args.seed)
    eval_texts = {name: tokenize_text(tokenizer, name, args.eval_tokens) for name in args.eval_text}
    for name, ids in eval_texts.items():
        if ids.numel() < args.eval_seqlen:
            raise UserError(f"evaluation text {name!r} has {ids.numel()} tokens, fewer than one window of "
                            f"{args.eval_seqlen}")
    out = prepare_output(args)
    add_log_file(out)
    checkpoint = out / "checkpoint.pt"
    log.info("run folder %s; %s, transforms: %s", out, qconfig.name, ", ".join(enabled_transforms(args)) or "none")

    started = time.perf_counter()
    teacher = load_model(args.ckpt, compute_dtype(args), args.device)
    teacher.requires_grad_(False)
    results = {}
    evaluate(teacher, eval_texts, args.eval_seqlen, "float", results)
    if args.compare:
        rtn_args = argparse.Namespace(**{**vars(args), "weights": "rtn"})
        for method in ("rtn", "rotation"):
            baseline = quantize_baseline(teacher, qconfig, method, calib, rtn_args)
            evaluate(baseline, eval_texts, args.eval_seqlen, method, results)
            if args.weights == "gptq" and method == "rotation":
                apply_gptq(baseline, calib, args)
                evaluate(baseline, eval_texts, args.eval_seqlen, f"{method} gptq", results)
            del baseline

    student = QuantizedModel(teacher, qconfig, enabled_transforms(args), seed=args.seed)
    start = load_state(checkpoint, student) if args.resume is not None and checkpoint.exists() else None
    if start is not None:
        log.info("resuming from %s: %s phase, step %d", checkpoint, start["phase"], start["step"])
    if start is None or start["phase"] == "local":
        local_phase(student, calib, args, checkpoint, start)
        student.calibrate(calib.to(args.device), args.range_method,
                          progress=Progress("calibration", calib.shape[0], unit="windows"))
        start = None
        if args.compare:
            evaluate(student, eval_texts, args.eval_seqlen, "fptquant local", results)
    elif args.compare:
        log.info("resumed in the end-to-end phase: the 'fptquant local' row is not available")
    e2e_phase(student, teacher, calib, args, checkpoint, start)

    with torch.no_grad():
        probe = calib[:1].to(args.device)
        before = student(probe)
        student.merge()
        after = student(probe)
    difference = (after - before).abs().max().item() / before.abs().max().item()
    log.info("merge check: max |merged - unmerged| / max |logit| = %.2e", difference)
    if difference > 1e-3:
        raise TrainingError(f"the merged model differs from the unmerged one by {difference:.2e} (relative); "
                            "this is a bug in a transform's merge")

    evaluate(student, eval_texts, args.eval_seqlen, "fptquant", results)
    gptq_settings = None
    if args.weights == "gptq":
        gptq_settings = apply_gptq(student, calib, args)
        evaluate(student, eval_texts, args.eval_seqlen, "fptquant gptq", results)
    save_merged(student, args, out)
    write_json(out / "results.json", {"config": qconfig.name, "transforms": enabled_transforms(args),
                                      "weights": args.weights, "gptq": gptq_settings,
                                      "merge_check": difference, "results": results})
    log.info("finished in %s; %s", format_seconds(time.perf_counter() - started), peak_memory(args.device))
    print(results_table(results))
    return results


def save_merged(student: QuantizedModel, args, out: Path) -> None:
    """Write merged/ (a Hugging Face folder with the quantized export inside), atomically."""
    from safetensors.torch import save_file

    tmp = out / "merged.tmp"
    save_checkpoint(student.model, tmp, resolve_checkpoint(args.ckpt) / "tokenizer.json")
    save_file(export_quantized(student.model), str(tmp / QUANTIZED_FILE), metadata={"config": student.qconfig.name})
    replace_dir(tmp, out / "merged")
    log.info("saved %s (load it with --ckpt %s)", out / "merged", out / "merged")


if __name__ == "__main__":
    run_cli(main)
