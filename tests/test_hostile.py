"""A hostile user, through the CLI in a subprocess: pickled weights, Ctrl-C and SIGTERM, two processes on one
output, damaged files read back, wrong devices, padded fields, too few prompts. Every failure is one line, exits
non-zero, happens before the model loads where it can, and leaves nothing that --resume cannot use."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from factscope.rundir import read_csv

FACTS = [
    ("landmark_country", "The Colosseum", "Fact: The Colosseum is in the country of", "Italy"),
    ("landmark_country", "The Eiffel Tower", "Fact: The Eiffel Tower is in the country of", "France"),
    ("landmark_country", "The Kremlin", "Fact: The Kremlin is in the country of", "Russia"),
    ("capital_city", "France", "Fact: The capital of France is the city of", "Paris"),
    ("capital_city", "Italy", "Fact: The capital of Italy is the city of", "Rome"),
    ("capital_city", "Russia", "Fact: The capital of Russia is the city of", "Moscow"),
]


def write_facts(path: Path, rows=FACTS) -> Path:
    keys = ("relation", "subject", "prompt", "attribute")
    path.write_text("".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows), encoding="utf-8")
    return path


def command(*args) -> list[str]:
    return [sys.executable, "-m", "factscope", *map(str, args)]


def interruptible(*args) -> subprocess.Popen:
    """`factscope args` started as from a terminal, SIGINT at its default: a test run in the background (`cmd &` in a
    non-interactive shell, as a CI script may start it) hands its children SIGINT ignored, which factscope respects."""
    return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def cli(*args) -> subprocess.CompletedProcess:
    # wide enough that rich's tables keep each cell on one line
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("factscope: error:")]


def refused(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The one error line of a run that exited with `code`, checked to hold every word."""
    lines = error_lines(result.stderr)
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    return write_facts(tmp_path_factory.mktemp("facts") / "facts.jsonl")


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, facts, tmp_path_factory) -> Path:
    """A finished analysis; while it runs, a second process on the same --out is refused and the first is unharmed."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    first = subprocess.Popen(command("analyze", "--model", tiny_llama_dir, "--dataset", facts, "--out", out,
                                     "--all-prompts", "--batch-size", "1", "--no-bos"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out.parent / ".run.lock").exists() or first.poll() is not None)
    second = cli("analyze", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--overwrite", "--z", "2")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    refused(second, str(out), "another factscope process")
    assert json.loads((out / "run.json").read_text())["config"]["z"] == 3.0  # the first run's, not the second's
    assert json.loads((out / "summary.json").read_text())["n_analysed"] == len(FACTS)
    assert pd.read_parquet(out / "attributions.parquet")["prompt_id"].nunique() == len(FACTS)
    assert leftovers(out) == []
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------
# Weights: never unpickled


class Payload:
    """Unpickling this touches a file: what a malicious pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_refused_unread(tiny_llama_dir, tmp_path):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    line = refused(cli("recall", "--model", model, "--out", tmp_path / "out"), "pytorch_model.bin", "safe_serialization=True")
    assert "pickled" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Signals: exit 128 + signal, keep only what --resume can use, and say so


def test_sigint_during_analyze_exits_130_and_keeps_the_finished_batches(tiny_llama_dir, tmp_path):
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    process = interruptible("analyze", "--model", tiny_llama_dir, "--out", out, "--all-prompts", "--batch-size", "1")
    wait_for(lambda: len(list((staging / "batches").glob("*.done"))) >= 2)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 20  # promptly: not after the remaining ~140 batches
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    refused(result, "interrupted by SIGINT", str(staging), "--resume", f"rm -rf {staging}", code=130)
    assert not out.exists() and list((staging / "batches").glob("*.done"))
    assert leftovers(out) == [".run.partial"]  # and no lock


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_before_any_batch_leaves_nothing(tiny_llama_dir, facts, tmp_path, signum, code):
    out = tmp_path / "out"
    process = interruptible("recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out)
    wait_for(lambda: (tmp_path / ".out.lock").exists() or process.poll() is not None)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("recall finished before the signal arrived")
    refused(subprocess.CompletedProcess(process.args, process.returncode, "", stderr),
            f"interrupted by {signal.Signals(signum).name}", code=code)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# A failed run leaves nothing; a failed --overwrite leaves the old run


def test_failed_overwrite_keeps_the_old_run_and_leaves_no_staging(tiny_llama_dir, facts, tmp_path):
    out = tmp_path / "out"
    assert cli("recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out).returncode == 0
    before = (out / "recall.csv").read_bytes()
    bad = write_facts(tmp_path / "bad.jsonl", [*FACTS, ("capital_city", "Spain", "Fact: The capital of", "Madrid")])
    refused(cli("analyze", "--model", tiny_llama_dir, "--dataset", bad, "--out", out, "--overwrite"), "bad.jsonl:7", "subject")
    assert (out / "recall.csv").read_bytes() == before
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------------
# One process per output directory


def test_ablate_and_trace_refuse_a_run_dir_another_process_holds(run_copy):
    before = sorted(p.name for p in run_copy.iterdir())
    with open(run_copy.parent / ".run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in ("ablate", "trace"):
            refused(cli(name, run_copy), str(run_copy), "another factscope process")
    assert sorted(p.name for p in run_copy.iterdir()) == before


# ---------------------------------------------------------------------------------------------------------------
# Files read back: one line naming the file, before the model loads


@pytest.mark.parametrize("command_, damaged, content", [
    ("trace", "summary.json", b'{"model": "x", '),
    ("ablate", "summary.json", b"[1, 2]"),
    ("ablate", "heads.csv", b'"layer","head\n1,"2\n\x00\x01'),
    ("ablate", "heads.csv", b"nothing,useful\n1,2\n"),
    ("trace", "run.json", b"\xff\xfe garbage"),
    ("report", "recall.csv", b'"a","b"\n1,2,3,4\n5\n'),
    ("report", "tokens.parquet", b"PAR1 not really parquet"),
])
def test_damaged_file_is_named_and_nothing_is_computed(run_copy, command_, damaged, content):
    (run_copy / damaged).write_bytes(content)
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()}
    result = cli(command_, run_copy)
    refused(result, str(run_copy / damaged))
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()} == before  # nothing written, nothing computed
    assert leftovers(run_copy) == []


def test_changed_dataset_is_refused_before_the_model_loads(run_copy, facts, tmp_path):
    manifest = json.loads((run_copy / "run.json").read_text())
    changed = write_facts(tmp_path / "changed.jsonl", FACTS[:-1])
    manifest["dataset"] = str(changed)
    (run_copy / "run.json").write_text(json.dumps(manifest))
    refused(cli("ablate", run_copy), str(changed), "changed since")
    assert not (run_copy / "knockout.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# Devices


def test_run_json_records_the_device_used(finished_run):
    assert json.loads((finished_run / "run.json").read_text())["config"]["device"] == "cpu"


@pytest.mark.parametrize("device", ["nonsense", "gpu:0", "cuda", "cuda:3", "mps", "auto"])
def test_unknown_or_absent_device_is_refused_before_the_model_loads(tiny_llama_dir, facts, tmp_path, device):
    if device.startswith(("cuda", "auto")) and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "out"
    refused(cli("recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--device", device), device)
    assert not out.exists() and leftovers(out) == []


def test_ablate_refuses_an_absent_device(run_copy):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    refused(cli("ablate", run_copy, "--device", "cuda"), "--device cuda")
    assert not (run_copy / "knockout.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# Padded fields


def test_spaces_around_subject_and_attribute_are_stripped(tiny_llama_dir, facts, tmp_path):
    padded = write_facts(tmp_path / "padded.jsonl", [(r, f" {s} ", p, f" {a}  ") for r, s, p, a in FACTS])
    clean_out, padded_out = tmp_path / "clean", tmp_path / "padded"
    assert cli("recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", clean_out).returncode == 0
    result = cli("recall", "--model", tiny_llama_dir, "--dataset", padded, "--out", padded_out)
    assert result.returncode == 0, result.stderr
    clean, spaced = read_csv(clean_out / "recall.csv"), read_csv(padded_out / "recall.csv")
    assert list(spaced["attribute"]) == [a for *_, a in FACTS] and list(spaced["subject"]) == [s for _, s, *_ in FACTS]
    assert list(spaced["prompt"]) == [p for _, _, p, _ in FACTS]
    columns = ["rank", "prob", "logit", "correct"]
    pd.testing.assert_frame_equal(spaced[columns], clean[columns])


# ---------------------------------------------------------------------------------------------------------------
# Too few prompts: no verdict


def test_ablate_on_a_handful_of_prompts_gives_no_verdict(run_copy):
    result = cli("ablate", run_copy, "--limit", "3", "--noise-scales", "0", "--seeds", "0", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stdout.lower()
    assert "interaction inconclusive on 3 prompts" in result.stdout
    verdict = next(line for line in result.stdout.splitlines() if "rerun `factscope ablate" in line)
    assert "inconclusive" in verdict and "too few prompts (3;" in verdict and "departs" not in verdict
