"""What factscope may touch, run and believe, tried as a careless or hostile user would, through the CLI in a fresh
subprocess. Every path lives in the test's tmp dir, HOME and FACTSCOPE_CACHE included: a test here that went wrong
deletes a fake home directory, never a real one. Nothing here ever passes `/` or a real folder with --overwrite.

Each refusal is one line, exits 2, comes before the model loads where it can, and leaves every file as it was."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factscope import models, rundir, stages
from factscope.errors import FactscopeError

FACTS = [
    ("landmark_country", "The Colosseum", "Fact: The Colosseum is in the country of", "Italy"),
    ("landmark_country", "The Eiffel Tower", "Fact: The Eiffel Tower is in the country of", "France"),
    ("capital_city", "France", "Fact: The capital of France is the city of", "Paris"),
    ("capital_city", "Italy", "Fact: The capital of Italy is the city of", "Rome"),
]
KEYS = ("relation", "subject", "prompt", "attribute")


def write_facts(path: Path, rows=FACTS) -> Path:
    path.write_text("".join(json.dumps(dict(zip(KEYS, row))) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def sandbox(tmp_path) -> dict[str, str]:
    """The environment of every command here: a fake home (with the dotfiles a real one has) and an empty cache."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (home / ".config" / "settings.toml").write_text("keep = true\n")
    (home / "project").mkdir()
    (home / "project" / "notes.md").write_text("# my notes\n")
    return {**os.environ, "HOME": str(home), "FACTSCOPE_CACHE": str(tmp_path / "cache"), "COLUMNS": "400"}


def cli(env: dict, *args, cwd: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd, input=stdin)


def refused(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("factscope: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in lines[0], result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`, links as their targets, files as their bytes."""
    state: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return state


@pytest.fixture(scope="module")
def analysed(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysed")
    facts = write_facts(root / "facts.jsonl")
    out = root / "run"
    stages.analyze(str(tiny_llama_dir), facts, out, all_prompts=True, batch_size=2)
    return out


@pytest.fixture
def run_copy(analysed, tmp_path) -> Path:
    return Path(shutil.copytree(analysed, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------
# Data loss: --overwrite replaces only what factscope wrote


def test_overwrite_refuses_a_home_directory_and_touches_nothing(tiny_llama_dir, sandbox, tmp_path):
    home = Path(sandbox["HOME"])
    before = snapshot(home)
    facts = write_facts(tmp_path / "facts.jsonl")
    for out in (home, home / "project"):
        line = refused(cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--overwrite"),
                       str(out), "not a factscope output")
        assert "choose another --out" in line
    assert snapshot(home) == before


def test_out_dot_and_root_are_refused_in_one_line(tiny_llama_dir, sandbox, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", ".", "--overwrite", cwd=work),
            str(work))
    refused(cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", "/"), "root directory")
    assert snapshot(work) == {"keep.txt": b"mine"}
    # `/` with --overwrite only ever as a pure check, never through a command that could act on it
    with pytest.raises(FactscopeError, match="root directory"):
        rundir.check_output("/", overwrite=True)


def test_overwrite_refuses_the_folder_holding_the_current_directory(run_copy, sandbox):
    inside = run_copy / "figures"
    inside.mkdir(exist_ok=True)
    with pytest.raises(FactscopeError, match="holds the current directory"):
        previous = os.getcwd()
        os.chdir(inside)
        try:
            rundir.check_output(run_copy, overwrite=True)
        finally:
            os.chdir(previous)


def test_resume_never_replaces_a_finished_run(run_copy, tiny_llama_dir, sandbox, tmp_path):
    before = snapshot(run_copy)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "analyze", "--model", tiny_llama_dir, "--dataset", facts, "--out", run_copy, "--resume"),
            str(run_copy), "finished run")
    assert snapshot(run_copy) == before


def test_overwrite_refuses_a_run_holding_its_dataset(tiny_llama_dir, sandbox, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "run"
    assert cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out).returncode == 0
    inside = Path(shutil.copy(facts, out / "facts.jsonl"))
    manifest = json.loads((out / "run.json").read_text())
    manifest["dataset"] = str(inside)  # as if the run had been made from the copy inside it
    (out / "run.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    refused(cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", inside, "--out", out, "--overwrite"), str(out))
    assert snapshot(out) == before
    (out / "facts.jsonl").unlink()  # the run's own files and a dataset outside it: replaced as asked
    result = cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "run.json").read_text())["dataset"] == str(facts)


def test_overwrite_replaces_an_empty_folder_and_a_run_it_wrote(tiny_llama_dir, sandbox, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "empty"
    out.mkdir()
    for _ in range(2):
        result = cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--overwrite")
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["recall.csv", "run.json", "summary.json"]


# ---------------------------------------------------------------------------------------------------------------
# Writes through planted links; locks on the resolved path


def test_report_never_writes_through_a_planted_temporary_link(run_copy, sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run_copy / ".report.html.tmp").symlink_to(victim)
    result = cli(sandbox, "report", run_copy)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious"
    assert (run_copy / "report.html").is_file() and not (run_copy / "report.html").is_symlink()


def test_a_planted_staging_link_is_refused(tiny_llama_dir, sandbox, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    out = tmp_path / "run"
    (tmp_path / ".run.partial").symlink_to(victim)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "analyze", "--model", tiny_llama_dir, "--dataset", facts, "--out", out, "--resume"),
            ".run.partial")
    assert snapshot(victim) == {"data.txt": b"precious"} and not out.exists()


def test_a_symlinked_run_dir_is_locked_as_the_real_one(run_copy, sandbox, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run_copy)
    before = snapshot(run_copy)
    with open(run_copy.parent / ".run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refused(cli(sandbox, "ablate", link), "another factscope process")
    assert snapshot(run_copy) == before


def test_compare_and_import_refuse_to_overwrite_a_file_they_did_not_write(run_copy, analysed, sandbox, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>my own page</html>")
    refused(cli(sandbox, "compare", analysed, run_copy, "--out", page, "--overwrite"), str(page), "not a file factscope wrote")
    assert page.read_text() == "<html>my own page</html>"
    result = cli(sandbox, "compare", analysed, run_copy, "--out", tmp_path / "compare.html")
    assert result.returncode == 0, result.stderr
    result = cli(sandbox, "compare", analysed, run_copy, "--out", tmp_path / "compare.html", "--overwrite")
    assert result.returncode == 0, result.stderr  # its own page it replaces

    source = tmp_path / "known.json"
    source.write_text(json.dumps([{"known_id": 0, "subject": "France", "attribute": "Paris", "template": "The capital of {} is",
                                   "prediction": " Paris", "prompt": "The capital of France is", "relation_id": "P36"}]))
    mine = tmp_path / "facts.jsonl"
    mine.write_text('{"my": "data"}\n')
    refused(cli(sandbox, "import-facts", source, "--format", "known_1000", "--out", mine, "--overwrite"), str(mine))
    assert mine.read_text() == '{"my": "data"}\n'


# ---------------------------------------------------------------------------------------------------------------
# A model directory's code is never run


def custom_code_model(tiny_llama_dir: Path, folder: Path, where: str) -> tuple[Path, Path]:
    model = Path(shutil.copytree(tiny_llama_dir, folder))
    marker = folder.parent / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    if where == "python only":
        return model, marker
    name = "config.json" if where == "config" else "tokenizer_config.json"
    (model / "evil.py").rename(model / "modeling_evil.py")
    record = json.loads((model / name).read_text())
    record["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.EvilConfig",
                          "AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    (model / name).write_text(json.dumps(record))
    return model, marker


@pytest.mark.parametrize("where", ["config", "tokenizer config", "python only"])
def test_custom_code_is_refused_whatever_stdin_says(tiny_llama_dir, sandbox, tmp_path, where):
    model, marker = custom_code_model(tiny_llama_dir, tmp_path / "model", where)
    facts = write_facts(tmp_path / "facts.jsonl")
    result = cli(sandbox, "recall", "--model", model, "--dataset", facts, "--out", tmp_path / "out", stdin="y\ny\ny\n")
    refused(result, str(model), "never runs a model directory's code")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "[y/N]" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Configs are checked against the weights before anything is allocated


def edited_config(tiny_llama_dir: Path, folder: Path, **changes) -> Path:
    model = Path(shutil.copytree(tiny_llama_dir, folder))
    config = json.loads((model / "config.json").read_text())
    config.update({key: value(config) if callable(value) else value for key, value in changes.items()})
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("changes, words", [
    ({"num_hidden_layers": lambda config: config["num_hidden_layers"] + 1}, ("declares", "layers but the weights hold")),
    ({"num_hidden_layers": lambda config: config["num_hidden_layers"] - 1}, ("declares", "layers but the weights hold")),
    ({"num_hidden_layers": 10**6}, ("declares 1000000 layers",)),
    ({"intermediate_size": 10**9}, ("describes at least",)),
    ({"num_hidden_layers": "two"}, ("num_hidden_layers must be a positive integer",)),
], ids=["one layer more", "one layer fewer", "a million layers", "absurd MLP", "not a number"])
def test_a_config_the_weights_do_not_fit_is_refused_before_loading(tiny_llama_dir, sandbox, tmp_path, changes, words):
    model = edited_config(tiny_llama_dir, tmp_path / "model", **changes)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "recall", "--model", model, "--dataset", facts, "--out", tmp_path / "out"),
            str(model / "config.json"), *words)
    assert not (tmp_path / "out").exists()


def test_missing_weights_are_refused_not_filled_at_random(tiny_llama_dir, tmp_path):
    """A tensor the layer-count check cannot see (a norm's gain): transformers' loading report names it."""
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    weights = load_file(model / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FactscopeError, match="lacks 1 weights.*model.norm.weight"):
        models.load_model(str(model))


@pytest.mark.parametrize("content, words", [
    (b"not a gguf at all", ("not a GGUF file",)),
    (b"GGUF" + (3).to_bytes(4, "little") + (10**15).to_bytes(8, "little") + b"\xff" * 64, ("cannot read this GGUF file",)),
], ids=["wrong magic", "forged header"])
def test_a_forged_gguf_is_named_in_one_line(sandbox, tmp_path, content, words):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "recall", "--model", gguf, "--dataset", facts, "--out", tmp_path / "out"), str(gguf), *words)


# ---------------------------------------------------------------------------------------------------------------
# The cache trusts only the user's own entries


def plant_entry(tiny_llama_dir: Path, cache: Path, name: str = "smollm2-135m") -> Path:
    """A cache entry as factscope writes one, for a named model, whose record matches its (tiny, wrong) files."""
    entry = cache / "models" / name
    shutil.copytree(tiny_llama_dir, entry)
    files = {path.name: {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
             for path in sorted(entry.iterdir())}
    record = {"gguf_sha256": models.NAMED_MODELS[name].gguf_sha256, "gguf": "planted", "files": files}
    (entry / models.CACHE_RECORD).write_text(json.dumps(record))
    return entry


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_a_cache_entry_another_user_owns_is_refused(tiny_llama_dir, sandbox, tmp_path):
    entry = plant_entry(tiny_llama_dir, Path(sandbox["FACTSCOPE_CACHE"]))
    for path in [entry, *entry.iterdir()]:
        os.chown(path, 65534, 65534)
    before = snapshot(entry)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "recall", "--dataset", facts, "--out", tmp_path / "out"), str(entry), "owned by uid 65534")
    assert snapshot(entry) == before  # refused, not deleted: it is not factscope's to remove


@pytest.mark.parametrize("plant", ["world-writable models folder", "entry is a link", "file is a link"])
def test_a_cache_others_could_write_to_is_refused(tiny_llama_dir, sandbox, tmp_path, plant):
    cache = Path(sandbox["FACTSCOPE_CACHE"])
    entry = plant_entry(tiny_llama_dir, cache)
    if plant == "world-writable models folder":
        (cache / "models").chmod(0o777)
        words = ("others can write to",)
        named = cache / "models"
    elif plant == "entry is a link":
        real = Path(shutil.move(entry, tmp_path / "elsewhere"))
        entry.symlink_to(real)
        words, named = ("symbolic link",), entry
    else:
        weights = entry / "model.safetensors"
        real = Path(shutil.move(weights, tmp_path / "weights.safetensors"))
        weights.symlink_to(real)
        words, named = ("symbolic link",), weights
    before = snapshot(tmp_path)
    facts = write_facts(tmp_path / "facts.jsonl")
    refused(cli(sandbox, "recall", "--dataset", facts, "--out", tmp_path / "out"), str(named), *words)
    assert snapshot(tmp_path) == {**before, "facts.jsonl": facts.read_bytes()}


def test_a_local_model_is_named_by_the_hash_of_its_weights(tiny_llama_dir, tmp_path):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    first = models.load_model(str(model)).weights_sha256
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()
    stamp = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same name, size and times; other weights
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert models.load_model(str(model)).weights_sha256 != first


# ---------------------------------------------------------------------------------------------------------------
# Provenance: one read of the dataset; run.json and summary.json agree


def test_a_dataset_edited_while_the_model_loads_is_recorded_as_it_was_read(tiny_llama_dir, tmp_path, monkeypatch):
    facts = write_facts(tmp_path / "facts.jsonl")
    read = facts.read_bytes()
    load_model = models.load_model

    def load_and_edit(*args, **kwargs):
        write_facts(facts, FACTS[:2])  # another process edits the file meanwhile
        return load_model(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_and_edit)
    run = stages.recall(str(tiny_llama_dir), facts, tmp_path / "run")
    assert run.manifest["dataset_sha256"] == hashlib.sha256(read).hexdigest()
    assert len(run.recall) == len(FACTS)  # the facts the recorded bytes hold


@pytest.mark.parametrize("field, value", [("dtype", "bfloat16"), ("prepend_bos", True), ("model", "smollm2-135m")])
def test_run_json_disagreeing_with_summary_json_is_refused(run_copy, sandbox, field, value):
    manifest = json.loads((run_copy / "run.json").read_text())
    if field == "model":
        manifest["model"] = value
    else:
        manifest["config"][field] = value
    (run_copy / "run.json").write_text(json.dumps(manifest))
    before = snapshot(run_copy)
    refused(cli(sandbox, "ablate", run_copy), str(run_copy / "summary.json"), field, "disagrees")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------------------------
# Input checked before the model loads; user text never read as markup


def test_an_unpaired_surrogate_is_named_before_the_model_loads(sandbox, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(dict(zip(KEYS, FACTS[0]))) + "\n"
                     + '{"relation": "r", "subject": "A\\ud800", "prompt": "Fact: A\\ud800 is in", "attribute": "B"}\n')
    # a model that does not exist: the dataset's error must come first, before any model is looked for
    refused(cli(sandbox, "recall", "--model", tmp_path / "absent", "--dataset", facts, "--out", tmp_path / "out"),
            f"{facts}:2", "'subject'", "unpaired surrogate")


@pytest.mark.parametrize("seeds", [str(2**64), "-1", "1.5"])
def test_seeds_out_of_range_are_refused_before_the_model_loads(run_copy, sandbox, seeds):
    before = snapshot(run_copy)
    result = cli(sandbox, "trace", run_copy, "--seeds", f"0,{seeds}")
    if seeds == "1.5":  # not an integer: the option parser's own usage error
        assert result.returncode == 2 and "--seeds" in result.stderr and "Traceback" not in result.stderr
    else:
        refused(result, f"seed {seeds}", "0 to 2^63-1")
    assert snapshot(run_copy) == before


def test_relation_names_that_look_like_markup_print_as_written(tiny_llama_dir, sandbox, tmp_path):
    rows = [("[/fs]", *FACTS[0][1:]), ("[bold red]x[/]", *FACTS[2][1:])]
    facts = write_facts(tmp_path / "fa[x]cts.jsonl", rows)
    result = cli(sandbox, "recall", "--model", tiny_llama_dir, "--dataset", facts, "--out", tmp_path / "o[b]t")
    assert result.returncode == 0, result.stderr
    assert "[/fs]" in result.stdout and "[bold red]x[/]" in result.stdout
    assert f"wrote {tmp_path / 'o[b]t'}/recall.csv" in result.stderr
