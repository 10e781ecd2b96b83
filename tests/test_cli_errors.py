"""Bad input to eval.py gives a one-line error, exit status 2 and no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_model, tiny_config
from test_model import write_hf_folder

REPO = Path(__file__).resolve().parents[1]


def run_eval(*args):
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def good_folder(tmp_path):
    write_hf_folder(random_model(tiny_config()), tmp_path / "good")
    return tmp_path / "good"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("a " * 200)
    return path


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_good_folder_runs(good_folder, text_file):
    result = run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["seqlen"] == 16
    assert report["tokens"] == 192  # 200 tokens, 12 whole windows


def test_unknown_checkpoint_name(text_file):
    assert_user_error(run_eval("--ckpt", "no-such-model", "--text", text_file),
                      "no-such-model", "not found", "llama-7b")


def test_missing_config(good_folder, text_file):
    (good_folder / "config.json").unlink()
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file), "config.json", "not found")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_wrong_model_type(good_folder, text_file):
    edit_config(good_folder, model_type="gpt2")
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file), "model_type", "gpt2")


def test_missing_required_field(good_folder, text_file):
    edit_config(good_folder, hidden_size=None)
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file), "hidden_size", "missing")


def test_shape_mismatch(good_folder, text_file):
    edit_config(good_folder, intermediate_size=40)
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16),
                      "shape", "mlp")


def test_truncated_weights(good_folder, text_file):
    weights = good_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16),
                      "model.safetensors", "corrupt")


def test_missing_weights(good_folder, text_file):
    (good_folder / "model.safetensors").unlink()
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16), "no weights")


def test_missing_tokenizer(good_folder, text_file):
    (good_folder / "tokenizer.json").unlink()
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16), "tokenizer.json")


def test_text_shorter_than_window(good_folder, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a a a a a")
    assert_user_error(run_eval("--ckpt", good_folder, "--text", short, "--seqlen", 16), "fewer than one window")


def test_seqlen_longer_than_context(good_folder, text_file):
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 100000), "context")


def test_missing_text(good_folder):
    assert_user_error(run_eval("--ckpt", good_folder, "--text", "no-such-text", "--seqlen", 16), "no-such-text", "wikitext2")


def test_gptq_needs_a_quantized_model(good_folder, text_file):
    assert_user_error(run_eval("--ckpt", good_folder, "--text", text_file, "--seqlen", 16, "--weights", "gptq"),
                      "--weights gptq needs --config")
