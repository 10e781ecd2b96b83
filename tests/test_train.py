"""train.py on a tiny random checkpoint: phases, outputs, resume, non-finite stop, bad flags."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import train
from conftest import random_model, tiny_config
from eval import DATA_DIR, perplexity, tokenize_text
from fptquant import QuantConfig, QuantizedModel, load_quantizers
from model import UserError, load_model, load_tokenizer, save_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer over the 96 most frequent words of Emma."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny")
    words = Counter((DATA_DIR / "austen_emma.txt").read_text().split())
    vocab = {word: i for i, (word, _) in enumerate(words.most_common(96))}
    vocab["[UNK]"] = 96
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    save_checkpoint(random_model(tiny_config(max_position_embeddings=128)), folder / "ckpt", folder / "tokenizer.json")
    return folder / "ckpt"


def flags(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--seqlen", "16", "--eval-seqlen", "16",
            "--calib-tokens", "256", "--eval-tokens", "64", "--local-steps", "4", "--e2e-steps", "4",
            "--save-every", "2", *extra]


def test_run_writes_every_output(tiny_ckpt, tmp_path):
    results = train.main(flags(tiny_ckpt, tmp_path / "run", "--compare"))
    run = tmp_path / "run"
    for name in ("args.json", "train.log", "results.json", "checkpoint.pt", "merged/config.json",
                 "merged/model.safetensors", "merged/tokenizer.json", "merged/quantized.safetensors"):
        assert (run / name).is_file(), name
    assert set(results) == {"float", "rtn", "rotation", "fptquant local", "fptquant"}
    saved = json.loads((run / "results.json").read_text())
    assert saved["results"]["fptquant"]["wikitext2"]["tokens"] == 64
    assert saved["merge_check"] < 1e-4

    # merged/ loads with --ckpt and reproduces the quantized perplexity.
    model = load_model(str(run / "merged"))
    assert load_quantizers(model, run / "merged") == QuantConfig.from_name("W4A4KV4")
    ids = tokenize_text(load_tokenizer(str(run / "merged")), "wikitext2", 64)
    assert perplexity(model, ids, 16)["ppl"] == pytest.approx(results["fptquant"]["wikitext2"]["ppl"], rel=1e-5)


def build_student(tiny_ckpt, argv):
    args = train.parse_args(argv)
    teacher = load_model(str(tiny_ckpt)).requires_grad_(False)
    windows = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(0))
    return args, teacher, QuantizedModel(teacher, QuantConfig.from_name("W4A4KV4")), windows


def test_local_phase_lowers_loss_and_trains_every_transform(tiny_ckpt, tmp_path):
    args, _, student, windows = build_student(tiny_ckpt, flags(tiny_ckpt, tmp_path, "--local-steps", "30"))
    before = {name: value.clone() for name, value in student.transforms.state_dict().items()}
    losses = train.local_phase(student, windows, args, tmp_path / "checkpoint.pt")
    assert losses[-1] < 0.98 * losses[0]
    for name, param in student.transforms.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} was not updated"


def test_e2e_phase_lowers_loss(tiny_ckpt, tmp_path):
    args, teacher, student, windows = build_student(tiny_ckpt, flags(tiny_ckpt, tmp_path, "--e2e-steps", "24",
                                                                     "--e2e-batch", "16", "--e2e-lr", "1e-2",
                                                                     "--quantizer-lr", "1e-3"))
    student.calibrate(windows)
    losses = train.e2e_phase(student, teacher, windows, args, tmp_path / "checkpoint.pt")
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])


def test_same_seed_gives_same_numbers(tiny_ckpt, tmp_path):
    first = train.main(flags(tiny_ckpt, tmp_path / "a"))
    second = train.main(flags(tiny_ckpt, tmp_path / "b"))
    assert first == second


def test_resume_after_crash_equals_uninterrupted(tiny_ckpt, tmp_path, monkeypatch):
    reference = train.main(flags(tiny_ckpt, tmp_path / "full"))

    calls = {"n": 0}
    real = train.jensen_shannon

    def crash_at_third_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies after the step-2 checkpoint
        return real(*args)

    monkeypatch.setattr(train, "jensen_shannon", crash_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(tiny_ckpt, tmp_path / "crashed"))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train, "jensen_shannon", real)

    resumed = train.main(["--resume", str(tmp_path / "crashed")])
    assert resumed == reference


def test_non_finite_loss_stops_with_checkpoint_named(tiny_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.jensen_shannon

    def nan_at_fourth_step(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train, "jensen_shannon", nan_at_fourth_step)
    with pytest.raises(train.TrainingError, match=r"e2e loss became nan at step 3; last good checkpoint: .*checkpoint.pt"):
        train.main(flags(tiny_ckpt, tmp_path / "run"))


@pytest.mark.parametrize("extra, message", [
    (["--config", "W4A4"], "invalid quantization config"),
    (["--seqlen", "4096"], "longer than the model's context"),
    (["--calib-text", "wikitext2"], "evaluation text"),
    (["--calib-tokens", "100000000"], "fewer than"),
])
def test_bad_flags_fail_before_work(tiny_ckpt, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train.main(flags(tiny_ckpt, tmp_path / "run") + extra)
    assert not (tmp_path / "run").exists()


def test_empty_calibration_text_rejected(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="fewer than"):
        train.main(flags(tiny_ckpt, tmp_path / "run", "--calib-text", str(empty)))


def test_gptq_weights_in_train_and_eval(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    run = tmp_path / "run"
    results = train.main(flags(tiny_ckpt, run, "--config", "W4A8KV8", "--weights", "gptq", "--compare"))
    assert set(results) == {"float", "rtn", "rotation", "rotation gptq", "fptquant local", "fptquant",
                            "fptquant gptq"}
    assert results["fptquant gptq"] != results["fptquant"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["gptq"]["block_size"] == 128
    assert saved["gptq"]["damp"] == 0.01

    # merged/ contains the GPTQ weights.
    model = load_model(str(run / "merged"))
    load_quantizers(model, run / "merged")
    ids = tokenize_text(load_tokenizer(str(run / "merged")), "wikitext2", 64)
    assert perplexity(model, ids, 16)["ppl"] == pytest.approx(results["fptquant gptq"]["wikitext2"]["ppl"], rel=1e-5)

    # eval.py runs GPTQ on a merged checkpoint trained with RTN weights.
    rtn_run = tmp_path / "rtn"
    rtn = train.main(flags(tiny_ckpt, rtn_run, "--config", "W4A8KV8"))
    monkeypatch.setattr("sys.argv", ["eval.py", "--ckpt", str(rtn_run / "merged"), "--seqlen", "16", "--max-tokens",
                                     "64", "--calib-tokens", "256", "--weights", "gptq", "--json"])
    evaluation.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["model"] == "fptquant W4A8KV8 gptq"
    assert line["ppl"] != pytest.approx(rtn["fptquant"]["wikitext2"]["ppl"], rel=1e-6)


def test_preset_defaults_and_overrides():
    quick = train.parse_args([])
    assert quick.weights == "rtn"
    assert quick.seqlen == 512
    assert quick.e2e_steps == 30

    large = train.parse_args(["--preset", "large", "--e2e-steps", "7"])
    assert large.weights == "gptq"
    assert large.seqlen == 2048
    assert large.local_steps == 200
    assert large.e2e_steps == 7
