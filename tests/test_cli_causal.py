"""`factscope ablate` and `factscope trace` end to end on a finished tiny-Llama run: the tables they add, the
summary.json entries (checked against the tables), refusals that leave the run untouched, and the helpers that
choose prompts and summarise."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import build_full_run

from factscope import causal
from factscope.data import encode_all, load_facts, shipped_dataset
from factscope.rundir import TABLES, read_csv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    return build_full_run(tmp_path_factory.mktemp("cli-causal"), tiny_llama_dir)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def flat(entry: dict, prefix: str = "") -> dict:
    """A nested summary.json entry as one level of dotted keys (pytest.approx compares flat containers only)."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}.{index}": item for index, item in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_ablate_writes_every_table_and_its_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())["causal"]
    assert summary["ablate"] == {"mode": "mean", "window": 9, "noise_scales": [0.0, 1.0, 4.0], "seeds": [0, 1], "method": "both",
                                 "n_prompts": 24}
    # --method both: every path by AtP and exactly, compared on every (path, prompt)
    agreement = read_csv(run_dir / "atp_path_agreement.csv").set_index("kind")
    assert summary["path_ablations"]["method"] == "both" and not agreement["sampled"].any()
    assert summary["path_ablations"]["atp_agreement"]["n_cells"] == agreement.loc["all", "n_cells"]
    paths = read_csv(run_dir / "path_ablations.csv")
    assert (paths["method"] == "exact").sum() == summary["path_ablations"]["n_paths"] == ((paths["method"] == "atp") & (paths["effect"] == "direct")).sum()
    knockout = read_csv(run_dir / "knockout.csv")
    windows = knockout[knockout["condition"] == "window"]
    # 3 layers × what END may not see (no BOS: the first token is the sink)
    blocked = {"subject", "first", "relation", "end", "non_subject"}
    assert set(windows["blocked"]) == blocked and len(windows) == 3 * len(blocked) and set(windows["head_set"]) == {"window"}
    head_sets = knockout[knockout["condition"] == "heads"]
    assert set(head_sets["head_set"]) <= {"subject_heads", "relation_heads"}
    assert len(head_sets) == len(blocked) * head_sets["head_set"].nunique()
    assert (knockout["rel_change_p_low"] <= knockout["rel_change_p"] + 1e-12).all()
    assert (knockout["rel_change_p"] <= knockout["rel_change_p_high"] + 1e-12).all()
    assert (knockout["n_prompts"] == 24).all()
    for blocked, rows in windows.groupby("blocked"):
        worst = rows.loc[rows["rel_change_p"].idxmin()]
        entry = summary["knockout"][f"{blocked}_worst_window"]
        assert entry["rel_change_p"] == pytest.approx(worst["rel_change_p"])
        assert entry["layer"] == worst["layer"] and len(entry["layer_ci"]) == len(entry["picked_rel_change_p_ci"]) == 2
    ablations = read_csv(run_dir / "ablations.csv")
    assert ablations["mechanism_set"].iloc[0] == "none"
    assert set(ablations["effect"]) == {"total", "direct"}
    assert flat(summary["ablations"]) == pytest.approx(flat(causal.robustness_summary(ablations)), nan_ok=True)
    noise = read_csv(run_dir / "noise_robustness.csv")
    assert set(noise["noise_scale"]) == {0.0, 1.0, 4.0} and (noise["n_seeds"] == 2).all()
    assert summary["noise_robustness"]["all"]["accuracy_at_max_scale"] == pytest.approx(
        noise[(noise["mechanism"] == "all") & (noise["noise_scale"] == 4.0)]["accuracy"].iloc[0])
    for mechanism, entry in summary["noise_robustness"].items():  # read where the rule says, with its intervals
        rows = noise[noise["mechanism"] == mechanism]
        assert entry["at_halved"]["halved_scale"] == pytest.approx(rows["halved_scale"].iloc[0])
        assert entry["at_halved"]["halved_scale"] in (0.0, 1.0, 4.0) and len(entry["at_halved"]["margin_area_ci"]) == 2
    extraction = read_csv(run_dir / "extraction_rate.csv")
    assert set(extraction["sublayer"]) == {"attn", "mlp"} and summary["extraction_rate"]["attn"]["extraction_rate"] == pytest.approx(
        extraction[extraction["sublayer"] == "attn"]["extraction_rate"].max())
    enrichment = read_csv(run_dir / "enrichment.csv")
    assert len(enrichment) == 3 and summary["enrichment"]["min_median_rank_a"] == enrichment["median_rank_a"].min()


def test_trace_writes_the_table_peaks_and_enrichment_with_the_trace(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())["causal"]
    trace = pd.read_parquet(run_dir / "causal_trace.parquet")
    assert set(trace["kind"]) == {"resid", "attn", "mlp", "mlp_single", "mlp_without_mlp0"} and (trace["n_seeds"] == 1).all()
    # MLP0 apart from the peak MLP window, in summary.json beside the peaks, and with the enrichment
    split = summary["trace"]["mlp0"]
    assert split["token"] == "last_subject" and summary["enrichment"]["mlp0"] == split
    assert summary["trace"]["n_prompts"] == 8 and summary["trace"]["seeds"] == [0]
    peaks = read_csv(run_dir / "trace_peaks.csv")
    assert len(peaks) == len(summary["trace"]["peaks"]) == trace.groupby(["kind", "token"]).ngroups
    mlp = trace[(trace["kind"] == "mlp") & (trace["token"] == "last_subject")]
    assert summary["enrichment"]["mlp_trace_peak_layer"] == int(mlp.loc[mlp["indirect_effect"].idxmax(), "layer"])
    assert "ablations" in summary  # trace added to what ablate wrote, it did not replace it


def test_report_shows_the_causal_sections(run_dir):
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    for title in ("Attention knockout", "Ablations", "Causal tracing", "Noise robustness"):
        assert title in html
    assert "Causal tracing (noise on the subject" in html


def test_existing_tables_are_refused_and_left_untouched(run_dir):
    before = digests(run_dir)
    result = cli("ablate", run_dir, "--limit", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "knockout.csv: exists; pass --overwrite" in lines[0] and "Traceback" not in result.stderr
    assert digests(run_dir) == before


@pytest.fixture
def copy_of_run(run_dir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in (table for check in causal.CHECKS if check.command == "trace" for table in check.tables):
        (copy / TABLES[name]).unlink(missing_ok=True)  # everything `trace` writes, whichever --method made it
    return copy


def test_a_changed_dataset_is_refused(copy_of_run, tmp_path):
    dataset = tmp_path / "facts.jsonl"
    shutil.copy(shipped_dataset(), dataset)
    manifest = json.loads((copy_of_run / "run.json").read_text())
    manifest["dataset"] = str(dataset)
    (copy_of_run / "run.json").write_text(json.dumps(manifest))
    with dataset.open("a", encoding="utf-8") as f:
        f.write('{"prompt_id": "extra", "relation": "r", "subject": "Paris", "prompt": "Paris is in", "attribute": "France"}\n')
    result = cli("trace", copy_of_run, "--limit", "2", "--seeds", "0")
    assert result.returncode == 2 and "changed since the run" in result.stderr
    assert not (copy_of_run / "causal_trace.parquet").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seeds", "zero"), "expected comma-separated ints"),
        (("--seeds", ","), "give at least one value"),
        (("--limit", "0"), "--limit"),
        (("--window", "0"), "--window"),
    ],
)
def test_bad_options_are_usage_errors(copy_of_run, args, message):
    result = cli("trace", copy_of_run, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    result = cli("ablate", tmp_path)
    assert result.returncode == 2 and "run.json: missing" in result.stderr and "Traceback" not in result.stderr


def test_zero_mode_and_overwrite_replace_the_ablation_tables(copy_of_run):
    result = cli("ablate", copy_of_run, "--mode", "zero", "--limit", "6", "--noise-scales", "0", "--seeds", "0",
                 "--window", "3", "--overwrite", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    ablations = read_csv(copy_of_run / "ablations.csv")
    assert (ablations["mode"] == "zero").all() and (ablations["n_prompts"] == 6).all()
    summary = json.loads((copy_of_run / "summary.json").read_text())["causal"]
    assert summary["ablate"]["mode"] == "zero" and summary["ablate"]["window"] == 3
    # the run had --method both; this one ran the exact grid only, so the path tables of before are gone with their entry
    assert summary["ablate"]["method"] == "exact" and "path_ablations" not in summary
    assert not (copy_of_run / "path_ablations.csv").exists() and not (copy_of_run / "atp_path_agreement.csv").exists()


# --- helpers -------------------------------------------------------------------------------------------------------


def test_spread_takes_relations_in_turn_and_keeps_dataset_order(tiny_llama_dir):
    from factscope.models import load_model

    model = load_model(str(tiny_llama_dir))
    encoded = encode_all(load_facts(), model.tokenizer, model.prepend_bos)
    relations = list(dict.fromkeys(item.fact.relation for item in encoded))
    chosen = causal.spread(encoded, len(relations))
    assert [item.fact.relation for item in chosen] == relations
    assert causal.spread(encoded, None) == encoded and causal.spread(encoded, 10_000) == encoded
    double = causal.spread(encoded, 2 * len(relations))
    positions = [encoded.index(item) for item in double]
    assert positions == sorted(positions)
    assert pd.Series([item.fact.relation for item in double]).value_counts().eq(2).all()


def test_noise_summary_is_the_normalised_area_under_accuracy():
    table = pd.DataFrame({"mechanism": ["a"] * 3 + ["all"] * 3, "noise_scale": [0.0, 1.0, 3.0] * 2,
                          "accuracy": [1.0, 0.5, 0.5, 1.0, 0.0, 0.0]})
    summary = causal.noise_summary(table)
    assert summary["a"] == {"accuracy_at_max_scale": 0.5, "mean_accuracy_over_scales": pytest.approx((0.75 + 1.0) / 3)}
    assert summary["all"]["mean_accuracy_over_scales"] == pytest.approx(0.5 / 3)
    single = causal.noise_summary(table[table["noise_scale"] == 0.0])
    assert single["a"]["mean_accuracy_over_scales"] == 1.0


def test_knockout_summary_picks_the_most_harmful_window():
    rows = [dict(condition="window", head_set="window", blocked="subject", first_layer=i, last_layer=i + 2, n_heads=8,
                 rel_change_p=change, delta_logit=-i, accuracy_after=0.5) for i, change in enumerate([-0.1, -0.7, 0.2])]
    rows.append(dict(condition="heads", head_set="subject_heads", blocked="subject", first_layer=1, last_layer=2,
                     n_heads=2, rel_change_p=-0.3, delta_logit=-1.0, accuracy_after=0.25))
    summary = causal.knockout_summary(pd.DataFrame(rows))
    assert summary["subject_worst_window"]["layers"] == [1, 3]
    assert summary["subject_heads_to_subject"]["rel_change_p"] == -0.3
    assert np.isclose(summary["subject_worst_window"]["rel_change_p"], -0.7)


def test_ablate_reads_a_minus_mean_r_on_the_runs_own_r_r_whatever_the_limit(copy_of_run):
    """--limit cuts the prompts, not R_r: on the prompts it checks, the clean a − mean(R∖a) of `ablate` is the
    analysis's (the exact decomposition's sum). Three prompts of three relations would otherwise leave each R_r
    with one attribute and a − mean(R∖a) undefined."""
    from factscope.models import load_model

    result = cli("ablate", copy_of_run, "--limit", "3", "--noise-scales", "0", "--seeds", "0", "--window", "3",
                 "--overwrite", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((copy_of_run / "run.json").read_text())
    model = load_model(manifest["model"])
    chosen = [item.fact.prompt_id for item in causal.spread(encode_all(load_facts(), model.tokenizer, model.prepend_bos), 3)]
    parts = pd.read_parquet(copy_of_run / "attributions.parquet", filters=[("is_correct_target", "==", True)])
    analysed = parts.groupby("prompt_id")["logit_diff"].sum().loc[chosen].mean()
    ablations = read_csv(copy_of_run / "ablations.csv").query("effect == 'total'")
    clean = ablations.set_index("mechanism_set").loc["none", "mean_logit_diff"]
    assert np.isfinite(clean) and clean == pytest.approx(analysed, abs=2e-3)
