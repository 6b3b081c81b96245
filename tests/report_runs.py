"""Run directories for the report's tests, built through the CLI as users build them, and the fixtures that hand
them out (test modules import the fixtures they use by name):

- `full_dir`: a tiny random Llama re-summarised with a permissive class rule so that every class and every figure
  has something to show, plus a subject swap from the library and the causal tables from `factscope ablate` and
  `trace` (built once per session, whichever module asks first);
- `handbuilt_dir`: the hand-built one-layer GPT-2 (`handbuilt.py`), whose subject head and relation head are
  known, so the text about it can be checked against the truth;
- `minimal_dir`: what plain `analyze --all-prompts` writes for a random model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import handbuilt
from factscope.rundir import Run, load_run

_BUILT: dict[str, Path] = {}


def factscope(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "factscope", "--debug", *map(str, args)], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def analyze(model_dir: Path, out: Path, *extra: str) -> None:
    factscope("analyze", "--model", model_dir, "--out", out, *extra)


def build_full_run(root: Path, model_dir: Path) -> Path:
    """A tiny-Llama run with every table the report knows about (memoised for the session)."""
    if "full" in _BUILT:
        return _BUILT["full"]
    from factscope.data import encode_all, load_facts
    from factscope.mechanisms import ClassRule, summarize
    from factscope.models import load_model
    from factscope.mechanisms import swap_summary
    from factscope.swap import subject_swap

    out = root / "full-run"
    analyze(model_dir, out, "--all-prompts")
    # a random model writes ~1e-3 logits per head: a permissive rule gives it subject, relation and mixed heads
    summary = json.loads((out / "summary.json").read_text())
    summary.update(summarize(out, ClassRule(k=1.5, z=0.0, floor=0.0)))
    model = load_model(str(model_dir))
    encoded = encode_all(load_facts(), model.tokenizer, model.prepend_bos)
    heads = pd.read_csv(out / "heads.csv")
    swap = subject_swap(model, encoded, heads)
    swap.to_csv(out / "subject_swap.csv", index=False)
    summary["subject_swap"] = swap_summary(swap)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # the causal tables as users make them: through the CLI, on samples that cover every relation
    # both methods, for `ablate` and `trace`: the run then holds every table the report knows, AtP's included
    factscope("ablate", out, "--limit", "24", "--noise-scales", "0,1,4", "--seeds", "0,1", "--threads", "1", "--method", "both")
    factscope("trace", out, "--limit", "8", "--seeds", "0", "--threads", "1", "--method", "both")
    _BUILT["full"] = out
    return out


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    return build_full_run(tmp_path_factory.mktemp("report"), tiny_llama_dir)


@pytest.fixture(scope="module")
def full_run(full_dir) -> Run:
    return load_run(full_dir)


@pytest.fixture(scope="module")
def handbuilt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("handbuilt-report")
    model_dir = handbuilt.build_model_dir(root / "model")
    dataset = root / "facts.jsonl"
    dataset.write_text("".join(
        json.dumps({"id": f.prompt_id, "relation": f.relation, "subject": f.subject, "prompt": f.prompt,
                    "attribute": f.attribute}) + "\n"
        for f in handbuilt.facts()
    ))
    out = root / "run"
    analyze(model_dir, out, "--dataset", str(dataset), "--swap")
    return out


@pytest.fixture(scope="module")
def minimal_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """What plain `analyze --all-prompts` writes for a random model: no classified head, no swap, no causal."""
    out = tmp_path_factory.mktemp("minimal") / "run"
    analyze(tiny_llama_dir, out, "--all-prompts")
    return out


@pytest.fixture(scope="module")
def written(full_dir) -> Path:
    """report.html (and figures/*.png) of the full run."""
    from factscope.report import write_report

    return write_report(full_dir)
