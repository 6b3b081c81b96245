"""What every stage shares around its model work: the `Reporter` it talks through, the checks it makes before any
model work (device, output directory, a finished run and its inputs), and how a causal command writes its tables
back into a run and re-renders the report. `stages` holds the stages themselves."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from . import rundir
from .errors import FactscopeError

if TYPE_CHECKING:
    import pandas as pd

    from .data import Fact

Advance = Callable[[int], None]


class Reporter:
    """What a stage tells the person running it. Subclass it to show progress; this one is silent."""

    def status(self, text: str) -> AbstractContextManager:
        """Around a step of unknown length (loading a model)."""
        return nullcontext()

    def progress(self, label: str, total: int) -> AbstractContextManager[Advance]:
        """Around `total` steps; the context yields `advance(n)`."""
        return nullcontext(lambda n: None)

    def warn(self, text: str) -> None:
        """Something the person should know that does not stop the stage."""


QUIET = Reporter()


def write_report(run_dir: str | Path, pngs: bool = True, reporter: Reporter = QUIET) -> Path:
    """DIR/report.html (one self-contained file, opens offline) and DIR/figures/*.png from a finished run."""
    from .report import write_report as render

    with reporter.status("rendering the report"):
        return render(run_dir, pngs=pngs)


def remote_model(model_name: str, bos: bool | None, dtype: str, reporter: Reporter = QUIET):
    """What a remote run holds of the model: `nnsight_engine.ConfigOnlyModel` (config and tokenizer from the Hub, in
    the server's `dtype`), which stands in for the loaded model."""
    from .nnsight_engine import config_only_model

    with reporter.status(f"reading {model_name}'s config and tokenizer"):
        config, tokenizer = hub_config_and_tokenizer(model_name)
    return config_only_model(model_name, config, tokenizer, dtype, bos)


def hub_config_and_tokenizer(model: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        return (AutoConfig.from_pretrained(model, trust_remote_code=False),
                AutoTokenizer.from_pretrained(model, trust_remote_code=False))
    except (OSError, ValueError) as err:  # a repository naming custom code is a ValueError here
        raise FactscopeError(f"cannot read {model!r}'s config and tokenizer from the Hub ({str(err).splitlines()[0]})") from None


def check_device(device: str) -> None:
    """`device` in one line before the model loads: a device torch knows, on hardware this machine has. Without
    the check `--device cuda` on a machine with no GPU ran on the CPU and recorded "cuda"."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            raise FactscopeError("--device auto splits the layers over the GPUs, and torch sees no CUDA GPU; use --device cpu")
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise FactscopeError(f"--device {device!r}: unknown device; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FactscopeError(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise FactscopeError(f"--device {device}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise FactscopeError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise FactscopeError(f"--device {device!r}: factscope runs on cpu, cuda, cuda:N, mps or auto")


def finished_run(run_dir: str | Path) -> Path:
    """Checked before the run directory is locked, so that locking never creates a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FactscopeError(f"{run_dir}: not a directory; give a finished `factscope analyze` run")
    return run_dir


def refuse_existing(out: Path, overwrite: bool, resume: bool = False, dataset: str | Path | None = None) -> None:
    """Checked before any slow work, so a wrong --out costs nothing and nothing factscope did not write is replaced
    (`rundir.check_output`); the dataset is protected from an --overwrite of the folder that holds it."""
    rundir.check_output(out, overwrite, resume, protected=[dataset] if dataset is not None else [])


def causal_run(run_dir: Path) -> tuple[dict, pd.DataFrame, list[Fact]]:
    """A finished run's manifest, head table and facts, each checked before any model work."""
    from .data import read_dataset

    manifest = run_json(run_dir / rundir.MANIFEST)
    summary = run_json(run_dir / rundir.SUMMARY)  # rewritten after the checks ran: a damaged one must stop them first
    _check_agreement(run_dir, manifest, summary)
    heads = rundir.read_table(run_dir, "heads", required=True)
    lacking = sorted({"layer", "head", "class"} - set(heads.columns))
    if lacking:
        raise FactscopeError(f"{rundir.table_path(run_dir, 'heads')}: lacks column {lacking[0]!r}; rerun `factscope analyze`")
    if "model" not in manifest:
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: names no model; rerun `factscope analyze`")
    dataset = Path(manifest.get("dataset", ""))
    if not dataset.is_file():
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: its dataset {dataset} is not there (run from the directory the analysis ran in)")
    source = read_dataset(dataset)
    if source.sha256 != manifest.get("dataset_sha256"):
        raise FactscopeError(f"{dataset}: changed since the run that wrote run.json; rerun `factscope analyze`")
    return manifest, heads, source.facts


def _check_agreement(run_dir: Path, manifest: dict, summary: dict) -> None:
    """run.json says how the model ran (and the causal commands run it that way again); summary.json says what the
    tables were computed with. An edit to either makes them disagree, and a check would run in a dtype, or with a
    BOS, the tables were not made with: refused before the model loads."""
    config = manifest.get("config", {})
    recorded = {"model": manifest.get("model"), "weights_sha256": manifest.get("weights_sha256"),
                "prepend_bos": config.get("prepend_bos"),
                "dtype": config.get("dtype", "float32")}
    for key, value in recorded.items():
        if key in summary and summary[key] != value:
            raise FactscopeError(f"{run_dir / rundir.SUMMARY}: {key} {summary[key]!r} disagrees with "
                                 f"{rundir.MANIFEST}'s {value!r}; the run was edited — rerun `factscope analyze`")


def causal_inputs(run_dir: str | Path, command: str, overwrite: bool, device: str, threads: int | None,
                   limit: int | None, reporter: Reporter, remote: bool = False):
    """The run's model (same weights, same BOS) and the prompts it analysed (its known facts, or all of them
    after `analyze --all-prompts`), checked before the slow work; and the nnsight engine of a `remote` run (None
    otherwise), whose model is the config-only stand-in of `remote_model`."""
    from .causal import CHECKS, known_facts, remote_checks, spread
    from .data import encode_all

    checks = remote_checks(command) if remote else [check for check in CHECKS if check.command == command]
    existing = [rundir.table_path(run_dir, name) for check in checks for name in check.tables
                if rundir.table_path(run_dir, name).exists()]
    if existing and not overwrite:
        raise FactscopeError(f"{existing[0]}: exists; pass --overwrite to replace it")
    manifest, heads, facts = causal_run(Path(run_dir))
    if threads:
        import torch

        torch.set_num_threads(threads)
    check_device(device)
    prepend_bos = manifest.get("config", {}).get("prepend_bos")
    dtype = manifest.get("config", {}).get("dtype", "float32")  # the dtype the analysis ran in
    engine = None
    if remote:
        from . import remote as ndif

        model = remote_model(manifest["model"], prepend_bos, ndif.check_dtype(dtype), reporter)
        engine = ndif.remote_engine(model.name, model.tokenizer)
    else:
        from .models import load_model

        with reporter.status(f"loading {manifest['model']}"):
            model = load_model(manifest["model"], device=device, prepend_bos=prepend_bos, dtype=dtype)
    if model.weights_sha256 != manifest.get("weights_sha256"):
        raise FactscopeError(f"{run_dir / rundir.MANIFEST}: the weights of {manifest['model']} changed since the run")
    encoded = encode_all(facts, model.tokenizer, model.prepend_bos, max_tokens=model.max_tokens)
    if manifest.get("config", {}).get("known_only", True):  # the same prompts the analysis used
        with reporter.status("finding the known facts"):
            encoded = known_facts(model, encoded, engine=engine)
    known = spread(encoded, limit)
    if not known:
        raise FactscopeError(f"{manifest['model']} knows none of the facts in {manifest['dataset']}: nothing to check causally")
    return model, known, heads, engine


def run_targets(run_dir: Path, reporter: Reporter) -> dict[str, dict[int, str]] | None:
    """The run's own R_r (relation_targets.csv, written by `analyze`); None for a run from before it was kept."""
    from .data import targets_from_rows

    table = rundir.read_table(run_dir, "relation_targets")
    if table is None:
        reporter.warn(f"warning: {run_dir} has no {rundir.TABLES['relation_targets']} (an older run): R_r is taken "
                      "from the checked prompts, so a − mean(R∖a) may differ from the analysis's")
        return None
    return targets_from_rows(table[["relation", "target_token", "attribute"]].itertuples(index=False, name=None))


def run_json(path: Path) -> dict:
    if not path.is_file():
        raise FactscopeError(f"{path}: missing; is {path.parent} a finished `factscope analyze` run?")
    return rundir.read_json_object(path)


def write_causal(run_dir: Path, command: str, tables: dict, summary: dict, report: bool,
                  reporter: Reporter) -> rundir.Run:
    """Every table, then summary.json, each replaced atomically; the report is re-rendered last, so a rendering
    failure cannot cost the tables. What an earlier run of `command` wrote and this one did not (AtP tables after
    `--method atp`, rerun with `--method exact`) is removed with its summary entry, last: the report must not show
    a previous run's results beside this one's as if they belonged together."""
    from .causal import CHECKS

    checks = [check for check in CHECKS if check.command == command]
    run_summary = run_json(run_dir / rundir.SUMMARY)
    for name, table in tables.items():
        rundir.write_table(table, run_dir, name)
    causal = {key: value for key, value in run_summary.get("causal", {}).items()
              if key in summary or key not in {check.name for check in checks}}
    run_summary["causal"] = {**causal, **summary}
    rundir.write_json(run_dir / rundir.SUMMARY, run_summary)
    for name in {name for check in checks for name in check.tables} - set(tables):
        rundir.table_path(run_dir, name).unlink(missing_ok=True)
    if report:
        write_report(run_dir, reporter=reporter)
    return rundir.load_run(run_dir)
