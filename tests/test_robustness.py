"""Runs are reproducible byte for byte, and a run killed with SIGKILL resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


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
    (partial / "run.json").write_text(json.dumps({"config": {"batch_size": 99}}))
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
