"""The nnsight engine (`nnsight_engine`) against the TransformerLens engine, and `--remote`'s planning and errors.

Nothing here reaches NDIF: the engine runs in this process, plainly and through nnsight's serialisation path
(`remote="local"`, what a remote run sends), and the remote errors are produced with the transport (httpx) mocked
at its boundary. The attributions must be *bitwise* equal: both engines read the same fp32 tensors off the same
weights (eager attention's probabilities are TransformerLens's hook_pattern), and the maths are shared.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("nnsight")

from factscope.data import encode_all, load_facts  # noqa: E402
from factscope.decompose import decompose  # noqa: E402
from factscope.errors import FactscopeError  # noqa: E402
from factscope.models import load_model  # noqa: E402
from factscope.nnsight_engine import local_engine  # noqa: E402


def assert_same_decomposition(a, b) -> None:
    for table in ("attributions", "logit_lens", "recall"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_exact=True)
    for error in ("max_abs_reconstruction_error", "max_abs_head_error", "max_abs_model_logit_error"):
        assert getattr(a, error) == getattr(b, error)


@pytest.fixture(scope="module")
def tiny(model_dirs):
    torch.set_num_threads(1)
    model = load_model(str(model_dirs["llama"]))
    encoded = encode_all(load_facts()[:24], model.tokenizer, model.prepend_bos)
    return model_dirs["llama"], model, encoded, decompose(model, encoded, batch_size=8, known_only=False)


@pytest.mark.parametrize("remote", [False, "local"])
def test_nnsight_engine_equals_local_engine_bitwise(tiny, remote):
    folder, model, encoded, expected = tiny
    engine = local_engine(str(folder), remote=remote)
    got = decompose(model, encoded, batch_size=8, known_only=False, engine=engine)
    assert_same_decomposition(expected, got)
    assert engine.requests == 3  # one trace per batch of 8


def test_unknown_architecture_is_refused_by_name(model_dirs):
    with pytest.raises(FactscopeError, match="GPT2LMHeadModel"):
        local_engine(str(model_dirs["gpt2"]))


def test_engine_refuses_a_tensor_it_cannot_read(tiny):
    folder, model, encoded, _ = tiny
    engine = local_engine(str(folder))
    tokens = torch.tensor([encoded[0].token_ids])
    with pytest.raises(FactscopeError, match="blocks.0.ln1_post.hook_scale"):
        engine(model, tokens, torch.ones_like(tokens), torch.tensor([tokens.shape[1] - 1]),
               ["blocks.0.ln1_post.hook_scale"])


def config_only(folder, engine):
    from transformers import AutoTokenizer

    from factscope.nnsight_engine import config_only_model

    return config_only_model("org/tiny", engine.lm.config, AutoTokenizer.from_pretrained(folder), dtype="float32")


@pytest.mark.parametrize("remote", [False, "local"])
@pytest.mark.parametrize("known_only", [False, True])
def test_projected_on_the_server_equals_local_engine_bitwise(tiny, remote, known_only, monkeypatch):
    """No local weight: the maths that read W_O, W_U and the final norm run inside the trace (end_maths), and the
    tables are the local engine's bit for bit, with the model standing in being config and tokenizer only."""
    import factscope.models

    folder, model, encoded, expected = tiny
    if known_only:
        expected = decompose(model, encoded, batch_size=8, known_only=True)
    engine = local_engine(str(folder), remote=remote)
    monkeypatch.setattr(factscope.models, "load_model", lambda *a, **k: pytest.fail("a remote run loaded weights"))
    got = decompose(config_only(folder, engine), encoded, batch_size=8, known_only=known_only, engine=engine)
    assert_same_decomposition(expected, got)
    assert engine.requests == 3


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_other_architectures_equal_local_engine_bitwise(model_dirs, family):
    """Qwen2: GQA and value biases (removed from the groups, counted with the attention bias, on the server too).
    Gemma 3: the attention post-norm (its END scale frozen, on both sides), the MLP's post-norm, the scaled
    embedding and the (1 + w) RMSNorm gain. With the raw END tensors and with the maths inside the trace."""
    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:8], model.tokenizer, model.prepend_bos)
    expected = decompose(model, encoded, known_only=False)
    engine = local_engine(str(folder), remote="local")
    assert_same_decomposition(expected, decompose(model, encoded, known_only=False, engine=engine))
    assert_same_decomposition(expected, decompose(config_only(folder, engine), encoded, known_only=False, engine=engine))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_server_norm_gain_is_the_local_engines(model_dirs, family):
    """end_maths.rms_gain, which the server runs on the norm's weight, gives the gain models._norm_affine reads by
    probing the module itself, bit for bit (fp32 and bf16: the casts differ by architecture)."""
    from factscope.end_maths import rms_gain
    from factscope.nnsight_engine import module_paths

    for dtype in ("float32", "bfloat16"):
        model = load_model(str(model_dirs[family]), dtype=dtype)
        kind = module_paths(model.bridge.original_model.config.architectures[0]).norm
        weight = model.bridge.original_model.model.norm.weight
        assert torch.equal(rms_gain(weight, model.cfg.eps, kind), model.final_norm[0])


def test_the_request_names_no_factscope_module(tiny, monkeypatch):
    """NDIF has torch and nnsight, not factscope: the payload must carry end_maths by source and reference no
    factscope module or class (which `remote="local"` alone would not notice, factscope being importable here)."""
    import io
    import pickletools

    from nnsight.schema import request

    payloads = []
    serialize = request.RequestModel.serialize.__func__

    def capture(cls, tracer, compress=False):
        payloads.append(serialize(cls, tracer, compress))
        return payloads[-1]

    monkeypatch.setattr(request.RequestModel, "serialize", classmethod(capture))
    folder, model, encoded, _ = tiny
    engine = local_engine(str(folder), remote="local")
    decompose(config_only(folder, engine), encoded[:4], known_only=False, engine=engine)
    tokens = torch.tensor([encoded[0].token_ids])
    engine.recall(config_only(folder, engine), tokens, torch.ones_like(tokens), torch.tensor([tokens.shape[1] - 1]),
                  torch.tensor([1]))
    from factscope.causal.knockout import knockout

    knockout(config_only(folder, engine), encoded[:4], heads={"some": [(1, 0)]}, engine=engine)  # 1 + 2 passes
    from factscope.causal.trace import trace_effects

    trace_effects(config_only(folder, engine), encoded[:4], seeds=(0,), engine=engine)  # one session
    from factscope.causal.enrichment import subject_enrichment
    from factscope.causal.extraction import extraction_rate

    extraction_rate(config_only(folder, engine), encoded[:4], engine=engine)
    subject_enrichment(config_only(folder, engine), encoded[:4], engine=engine)
    from factscope.causal.ablation import ablation_grid
    from factscope.causal.sites import HeadPath, MlpPath

    ablation_grid(config_only(folder, engine), encoded[:4], {"a": [HeadPath(1, 0, "subject")], "b": [MlpPath(1)]},
                  engine=engine)  # one session
    from factscope.causal.noise import noise_robustness

    noise_robustness(config_only(folder, engine), encoded[:4], {"a": [HeadPath(1, 0, "subject")], "b": [MlpPath(1)]},
                     scales=(1.0,), seeds=(0,), engine=engine)  # one session
    from factscope.causal.atp_paths import atp_path_effects

    atp_path_effects(config_only(folder, engine), encoded[:4], chunk=2, engine=engine)  # one session, two chunks
    from factscope.causal.atp import atp_trace

    atp_trace(config_only(folder, engine), encoded[:4], seeds=(0,), chunk=2, graddrop=True, engine=engine)  # one session
    assert len(payloads) == 12
    for payload in payloads:
        strings = [arg for _, arg, _ in pickletools.genops(io.BytesIO(payload)) if isinstance(arg, str)]
        assert not [s for s in strings if s.split(".")[0] in ("factscope", "jaxtyping", "einops")]
        assert any(f"def {name}" in s for s in strings
                   for name in ("project_end", "recall_stats", "end_block", "restore_rows", "extraction_events",
                                "lens_ranks", "frozen_final_norm", "noisy_heads", "path_changes",
                                "restoration_estimates"))


def test_recall_through_the_engine_equals_local_recall(tiny):
    from factscope.recall import recall

    folder, model, encoded, _ = tiny
    engine = local_engine(str(folder), remote="local")
    expected = recall(model, encoded, batch_size=8)
    got = recall(config_only(folder, engine), encoded, batch_size=8, engine=engine)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert engine.bytes_back == remote.recall_plan("org/tiny", len(encoded), 8).bytes_back


@pytest.mark.parametrize("command", ["analyze", "recall"])
def test_remote_stage_reads_no_weights_and_writes_the_local_tables(tiny, monkeypatch, tmp_path, command):
    """The library entry points with --remote, NDIF replaced by the same model in bf16 (what NDIF serves) through
    nnsight's serialisation path: config and tokenizer are all that is read locally, the tables are a local bf16
    run's bit for bit (`analyze --swap`'s too), the run records bf16, and the plan printed before sending is what
    the engine counted."""
    from transformers import AutoConfig, AutoTokenizer

    import factscope.models
    from factscope import stage_io, stages

    folder = tiny[0]
    engines = []

    def engine(model_id, tokenizer):
        engines.append(local_engine(str(folder), dtype="bfloat16", remote="local"))
        return engines[-1]

    # a lax class rule, so that the tiny model has classified heads whose parts the swap watches
    kwargs = {"report": False, "all_prompts": True, "swap": True, "k": 1.0, "z": 0.0} if command == "analyze" else {}
    kwargs["batch_size"] = 16
    local = getattr(stages, command)(str(folder), None, tmp_path / "local", dtype="bfloat16", **kwargs)
    monkeypatch.setattr(remote, "preflight", lambda model_id, send: None)
    monkeypatch.setattr(remote, "remote_engine", engine)
    monkeypatch.setattr(stage_io, "hub_config_and_tokenizer",
                        lambda model: (AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(factscope.models, "load_model", lambda *a, **k: pytest.fail("a remote run loaded weights"))
    run = getattr(stages, command)("org/tiny", None, tmp_path / "remote", remote=True, **kwargs)
    counted = {"requests": engines[0].requests, "bytes_back": engines[0].bytes_back}
    assert run.summary["remote"] == counted
    plan = stages.remote_plan("org/tiny", command=command, batch_size=16, swap=command == "analyze")
    assert {"requests": plan.requests, "bytes_back": plan.bytes_back} == counted
    assert run.manifest["config"]["dtype"] == "bfloat16"
    got, expected = (run.attributions(), local.attributions()) if command == "analyze" else (run.recall, local.recall)
    if command == "recall":
        got, expected = got.drop(columns="model"), expected.drop(columns="model")
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    if command == "analyze":
        swapped = run.subject_swap
        assert len(swapped) > 0 and swapped["rel_change"].notna().all()
        pd.testing.assert_frame_equal(local.subject_swap, swapped, check_exact=True)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_nnsight_engine_equals_local_engine_on_real_models(name):
    """The real models, fp32, through the serialisation path: every attribution bit for bit, with the raw END
    tensors (the maths here) and with the maths run inside the trace (no weights here)."""
    from factscope.nnsight_engine import config_only_model

    torch.set_num_threads(1)
    model = load_model(name)
    encoded = encode_all(load_facts()[:16], model.tokenizer, model.prepend_bos)
    expected = decompose(model, encoded, known_only=False)
    engine = local_engine(name, remote="local")
    assert_same_decomposition(expected, decompose(model, encoded, known_only=False, engine=engine))
    config_only = config_only_model(name, engine.lm.config, model.tokenizer, dtype="float32")
    assert_same_decomposition(expected, decompose(config_only, encoded, known_only=False, engine=engine))


# ---------------------------------------------------------------------------------------------------------------
# --remote: the cost plan and the one-line errors, the transport mocked where nnsight meets the network

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import httpx  # noqa: E402

from factscope import remote  # noqa: E402


def test_plan_counts_exactly_the_bytes_the_engine_brings_back(tiny):
    """The plan printed before sending is the engine's own count of what came back, not an estimate of it (all
    prompts: with known facts only, the unknown prompts' lens is not sent and the plan is an upper bound)."""
    from factscope.data import relation_targets

    folder, model, encoded, _ = tiny
    engine = local_engine(str(folder))
    decompose(config_only(folder, engine), encoded, batch_size=8, known_only=False, engine=engine)
    shape = remote.Shape.from_config(engine.lm.config)
    targets = relation_targets(encoded)
    widths = [1 + sum(t != item.attribute_token for t in targets[item.fact.relation]) for item in encoded]
    plan = remote.plan("org/tiny", shape, widths, 8)
    assert (plan.requests, plan.bytes_back) == (engine.requests, engine.bytes_back)
    assert "3 requests" in plan.describe()


def test_version_mismatch_is_one_line(monkeypatch):
    import nnsight

    monkeypatch.setattr(nnsight, "__version__", "0.7.2")
    with pytest.raises(FactscopeError, match=r"nnsight==0\.8\.1 \(installed: 0\.7\.2\)"):
        remote.check_client()


@pytest.mark.parametrize("name", ["smollm2-135m", "model.gguf", "meta-llama", "./org/model", "TMP"])
def test_remote_needs_a_hub_id(name, tmp_path):
    with pytest.raises(FactscopeError, match="Hub id"):
        remote.check_model_id(str(tmp_path) if name == "TMP" else name)


def test_missing_api_key_is_one_line(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(FactscopeError, match="NDIF_API_KEY"):
        remote.preflight("org/model", send=True)


def _status(deployments: dict):
    def get(url, **kwargs):
        return httpx.Response(200, json={"deployments": deployments}, request=httpx.Request("GET", url))
    return get


def test_hosted_model_passes_and_others_are_named(monkeypatch):
    monkeypatch.setattr(httpx, "get", _status({"a": {"repo_id": "meta-llama/Llama-3.1-70B"}}))
    remote.check_hosted("meta-llama/Llama-3.1-70B")
    with pytest.raises(FactscopeError, match=r"does not host 'org/model' now \(hosted: meta-llama/Llama-3.1-70B\)"):
        remote.check_hosted("org/model")


def test_unreachable_status_is_one_line(monkeypatch):
    def refuse(url, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(httpx, "get", refuse)
    with pytest.raises(FactscopeError, match="cannot reach NDIF .*ConnectError.*check the network"):
        remote.check_hosted("org/model")


@pytest.fixture
def hub_engine(tiny, monkeypatch):
    """The engine with remote=True over the tiny model, its Hub id faked so that nnsight builds a request."""
    import nnsight.modeling.huggingface as hf_modeling

    engine = local_engine(str(tiny[0]), remote=True)
    engine.lm.repo_id = "org/tiny"
    monkeypatch.setitem(hf_modeling._ID_CACHE, "org/tiny", "org/tiny")  # no Hub canonicalisation call
    return engine


@pytest.fixture
def sending_engine(tiny, hub_engine):
    """A call that sends one trace through `hub_engine`."""
    engine, (_, model, encoded, _) = hub_engine, tiny
    tokens = torch.tensor([encoded[0].token_ids])
    return lambda: engine(model, tokens, torch.ones_like(tokens), torch.tensor([tokens.shape[1] - 1]),
                          ["hook_embed"])


def unreachable_ndif(monkeypatch) -> None:
    """The transport at its boundary: the websocket to NDIF cannot be opened."""
    import websocket

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(websocket, "create_connection", refuse)


def refusing_ndif(monkeypatch) -> None:
    """The transport at its boundary: NDIF answers the request with 401 and the server's reason (a bad key)."""
    import websocket

    class Subscription:
        def recv(self):
            return json.dumps({"session_id": "s1"})

        def close(self):
            pass

    def post(self, url, **kwargs):
        return httpx.Response(401, json={"detail": "Invalid API key."}, request=httpx.Request("POST", url))

    monkeypatch.setattr(websocket, "create_connection", lambda *a, **k: Subscription())
    monkeypatch.setattr(httpx.Client, "post", post)


def test_unreachable_while_sending_is_one_line(sending_engine, monkeypatch):
    unreachable_ndif(monkeypatch)
    with pytest.raises(FactscopeError, match="cannot reach NDIF .*ConnectionRefusedError"), remote.one_line_errors():
        sending_engine()


def test_refused_request_is_one_line(sending_engine, monkeypatch):
    """The server's own reason (here a bad key) comes through nnsight's RemoteError as one line."""
    refusing_ndif(monkeypatch)
    with pytest.raises(FactscopeError, match="NDIF refused or failed the request: .*Invalid API key"), \
            remote.one_line_errors():
        sending_engine()


def factscope_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_remote_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    local = factscope_cli("analyze", "--remote", "--model", "smollm2-135m", "--out", out)
    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    no_key = subprocess.run([sys.executable, "-m", "factscope", "analyze", "--remote", "--model", "org/model",
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    for result, reason in ((local, "Hub id"), (no_key, "NDIF_API_KEY")):
        assert result.returncode == 2 and reason in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_cli_remote_refuses_a_dtype_ndif_does_not_serve(tmp_path):
    """NDIF serves bf16 only: --dtype float32 with --remote is refused in one line, before anything (not even the
    Hub) is read, rather than ignored; --dry-run refuses it too."""
    out = tmp_path / "run"
    for extra in ((), ("--dry-run",)):
        result = factscope_cli("analyze", "--remote", *extra, "--dtype", "float32", "--model", "org/model",
                               "--out", out, env={"NDIF_API_KEY": "key"})
        assert result.returncode == 2, result.stderr
        assert "--remote runs the model in bfloat16" in result.stderr
        assert "--dtype float32 cannot be honoured" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_a_server_running_another_dtype_is_refused_and_nothing_written(tiny, monkeypatch, tmp_path):
    """The run records the dtype the server ran in, checked on every request: an engine whose model runs in fp32
    under a run that records bf16 stops at the first request, in one line, with no run directory left."""
    from transformers import AutoConfig, AutoTokenizer

    from factscope import stage_io, stages

    folder = tiny[0]
    monkeypatch.setattr(remote, "preflight", lambda model_id, send: None)
    monkeypatch.setattr(remote, "remote_engine", lambda model_id, tokenizer: local_engine(str(folder), remote="local"))
    monkeypatch.setattr(stage_io, "hub_config_and_tokenizer",
                        lambda model: (AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)))
    for command in ("analyze", "recall"):
        with pytest.raises(FactscopeError, match="ran org/tiny in float32, not in bfloat16 as this run records it"):
            getattr(stages, command)("org/tiny", None, tmp_path / command, remote=True)
        assert not (tmp_path / command).exists()


def test_cli_dry_run_prints_the_plan_and_sends_nothing(tiny, monkeypatch, tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    from typer.testing import CliRunner

    from factscope import cli, stage_io

    folder = tiny[0]
    monkeypatch.setattr(stage_io, "hub_config_and_tokenizer",
                        lambda model: (AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)))

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run touched the network")

    monkeypatch.setattr(httpx, "get", no_network)
    monkeypatch.setattr(httpx.Client, "post", no_network)
    result = CliRunner().invoke(cli.app, ["analyze", "--remote", "--dry-run", "--model", "org/tiny",
                                          "--out", str(tmp_path / "run"), "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "remote plan for org/tiny: 144 prompts in 9 requests" in result.output
    swap = CliRunner().invoke(cli.app, ["analyze", "--remote", "--dry-run", "--swap", "--model", "org/tiny",
                                        "--out", str(tmp_path / "run"), "--batch-size", "16"])
    assert swap.exit_code == 0, swap.output
    assert "144 prompts in 27 requests" in swap.output and "--swap's two passes over 144 prompts" in " ".join(swap.output.split())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# ablate --remote: the attention knockout through the engine

@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_knockout_through_the_engine_equals_local_knockout_bitwise(model_dirs, family):
    """Every window and head set, every blocked group `ablate` uses: the engine cuts the attention mask where the
    local knockout cuts TransformerLens's scores (the same `end_maths.end_block`), and the scores computed on the
    server are the local ones bit for bit (Gemma 3: sliding-window layers, whose mask is their own)."""
    from factscope.causal import knockout

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    blocked = knockout.blocked_groups(model.prepend_bos)
    sets = {"subject_heads": [(1, 0), (1, 2)], "relation_heads": [(0, 3), (2, 1)]}
    engine = local_engine(str(folder), remote="local")
    for options in ({"window": 3}, {"heads": sets}):
        expected = knockout.knockout(model, encoded, blocked, **options)
        got = knockout.knockout(config_only(folder, engine), encoded, blocked, **options, engine=engine)
        pd.testing.assert_frame_equal(expected, got, check_exact=True)
        assert (expected["rel_change_p"] != 0).any()  # the cut changed something
    assert engine.requests == (1 + len(blocked) * 3) + (1 + len(blocked) * 2)


@pytest.mark.parametrize(("family", "remote"), [("llama", False), ("llama", "local"), ("qwen2", "local"),
                                                 ("gemma3", "local")])
def test_extraction_and_enrichment_through_the_engine_equal_local_bitwise(model_dirs, family, remote):
    """One read-only pass each: the engine reads attn_out / mlp_out at END (Gemma 3: after the post-norms) and the
    residual stream at the last subject token, and the projections, top-k and ranks run on the server
    (`end_maths.extraction_events`, `lens_ranks`) over the model's own unembedding and final norm: the tables are
    the local ones bit for bit, and only the events and the ranks come back."""
    from factscope.causal import enrichment, extraction
    from factscope.data import relation_targets

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    engine = local_engine(str(folder), remote=remote)
    stand_in = config_only(folder, engine)
    for top_k in (1, 10):  # top_k 1: the top-k event is the top-1 event
        expected = extraction.extraction_rate(model, encoded, top_k=top_k)
        got = extraction.extraction_rate(stand_in, encoded, top_k=top_k, engine=engine)
        pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert expected["extraction_rate_top_k"].nunique() > 1  # the events are not all alike
    expected = enrichment.subject_enrichment(model, encoded)
    got = enrichment.subject_enrichment(stand_in, encoded, engine=engine)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert expected["mean_rank_a"].nunique() > 1
    n_layers = model.cfg.n_layers
    costs = [extraction.remote_cost(n_layers, encoded)] * 2 + [enrichment.remote_cost(n_layers, encoded,
                                                                                       relation_targets(encoded))]
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == tuple(map(sum, zip(*costs)))


@pytest.mark.parametrize(("family", "remote", "mode"), [("llama", False, "mean"), ("llama", "local", "zero"),
                                                         ("llama", "local", "mean"), ("qwen2", "local", "mean"),
                                                         ("gemma3", "local", "mean"), ("gemma3", "local", "zero")])
def test_mechanism_grid_through_the_engine_equals_local_bitwise(model_dirs, family, remote, mode):
    """Every set of the grid, as total and as direct effects, in one nnsight session: the head paths removed from
    what the attention adds at END (Llama: the attention module's output, read after its pattern; Gemma 3: after
    its post-norm, with this pass's scale), MLPs replaced by their mean or zero, the direct effects added after the
    last block with the final norm's scale pinned to the clean one (TransformerLens's arithmetic for an edited
    scale): the table is the local one bit for bit, from one request bringing back the scores only."""
    from factscope.causal import ablation
    from factscope.causal.sites import HeadPath, MlpPath

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    mechanisms = {"a": [HeadPath(1, 0, "subject"), HeadPath(0, 2, "end")],
                  "b": [HeadPath(2, 1, "relation"), MlpPath(0)], "c": [MlpPath(2), HeadPath(1, 3, "all")]}
    expected = ablation.ablation_grid(model, encoded, mechanisms, mode)
    engine = local_engine(str(folder), remote=remote)
    got = ablation.ablation_grid(config_only(folder, engine), encoded, mechanisms, mode, engine=engine)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert (expected["delta_logit"] != 0).sum() == 2 * (len(ablation.mechanism_sets(list(mechanisms))) - 1)
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == ablation.CHECK.remote_cost(
        model.cfg.n_layers, encoded, mechanisms=mechanisms, mode=mode, targets=None)


@pytest.mark.parametrize(("family", "remote"), [("llama", False), ("llama", "local"), ("qwen2", "local"),
                                                 ("gemma3", "local")])
def test_noise_check_through_the_engine_equals_local_bitwise(model_dirs, family, remote):
    """Every (mechanism, scale, seed) pass of the noise check in one nnsight session, sent the local draws: head
    noise through each head's map at END (Gemma 3: through its post-norm at this pass's scale), MLP noise in the
    residual stream, the mechanism alone through the final norm at the clean scale: the table is the local one bit
    for bit, and the requests, bytes back and draw bytes sent are the check's remote cost."""
    from factscope.causal import noise
    from factscope.causal.sites import HeadPath, MlpPath

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    mechanisms = {"a": [HeadPath(1, 0, "subject"), HeadPath(0, 2, "end")],
                  "b": [HeadPath(2, 1, "relation"), MlpPath(0)], "c": [MlpPath(2), HeadPath(1, 3, "all")]}
    scales, seeds = (0.0, 1.0, 4.0), (0, 1)
    expected = noise.noise_robustness(model, encoded, mechanisms, scales, seeds)
    engine = local_engine(str(folder), remote=remote)
    got = noise.noise_robustness(config_only(folder, engine), encoded, mechanisms, scales, seeds, engine=engine)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert expected["first_among_r"].nunique() > 1 and expected["alone_first_among_r"].nunique() > 1
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == noise.CHECK.remote_cost(
        model.cfg.n_layers, encoded, mechanisms=mechanisms, noise_scales=scales, seeds=seeds, targets=None,
        **noise.draw_sizes(model))


def _path_atp_through_the_engine(model, remote_model, encoded, engine, mode: str, method: str, targets=None,
                                 per_kind: int | None = None, **options) -> None:
    """Path AtP (total and direct effects) in one session, and the exact ablation of its chosen paths (a sample, or
    every path with `both`; with `per_kind`, only the first that many of each kind) in the grid session, against
    the local ones (the exact ones by full passes, as `kv_cache=False`), bit for bit; the engine's requests and
    bytes are the check's remote cost (when every chosen path ran)."""
    from factscope.causal import atp_paths

    expected = atp_paths.atp_path_effects(model, encoded, mode, targets, **options)
    got = atp_paths.atp_path_effects(remote_model, encoded, mode, targets, engine=engine, **options)
    for local, through in zip(expected, got):
        assert torch.equal(local.effects.isnan(), through.effects.isnan())
        assert torch.equal(local.effects.nan_to_num(), through.effects.nan_to_num())
        assert (local.effects.nan_to_num() != 0).any() and torch.equal(local.present, through.present)
    chosen = expected[0].present if method == "both" else atp_paths.sample_paths(expected[0])
    if per_kind is not None:
        chosen = chosen & (chosen.flatten(1).cumsum(1) <= per_kind).view_as(chosen)
    exact = atp_paths.exact_path_effects(model, encoded, chosen, mode, targets, kv_cache=False)
    through = atp_paths.exact_path_effects(remote_model, encoded, chosen, mode, targets, engine=engine)
    assert torch.equal(exact.effects.nan_to_num(), through.effects.nan_to_num()) and (exact.effects.nan_to_num() != 0).any()
    if per_kind is not None:
        return
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == atp_paths.CHECK.remote_cost(
        model.cfg.n_layers, encoded, mode=mode, targets=targets, method=method, **atp_paths.path_sizes(model))


@pytest.mark.parametrize(("family", "remote", "mode", "method"), [
    ("llama", False, "mean", "atp"), ("llama", "local", "zero", "both"), ("llama", "local", "mean", "atp"),
    ("qwen2", "local", "mean", "both"), ("gemma3", "local", "mean", "atp"), ("gemma3", False, "zero", "both")])
def test_path_atp_through_the_engine_equals_local_bitwise(model_dirs, family, remote, mode, method):
    """`ablate --method atp|both` through the engine: the clean pass with a zero leaf where each path's removal would
    be written (what the attention adds at END, after Gemma's post-norm; the MLP's output), nnsight's backward
    pass to the leaves, and the frozen-norm backward of the direct effect, in chunks of 5 prompts, give AtP's
    estimates bit for bit (same functions, `end_maths`, on the same fp32 tensors and gradients); only the
    estimates come back."""
    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    engine = local_engine(str(folder), remote=remote)
    _path_atp_through_the_engine(model, config_only(folder, engine), encoded, engine, mode, method, chunk=5)


def _remote_stages(monkeypatch, folder, engines):
    """stages with NDIF replaced by the tiny model in bf16 through nnsight's serialisation path."""
    from transformers import AutoConfig, AutoTokenizer

    import factscope.models
    from factscope import stage_io, stages

    def engine(model_id, tokenizer):
        engines.append(local_engine(str(folder), dtype="bfloat16", remote="local"))
        return engines[-1]

    monkeypatch.setattr(remote, "preflight", lambda model_id, send: None)
    monkeypatch.setattr(remote, "remote_engine", engine)
    monkeypatch.setattr(stage_io, "hub_config_and_tokenizer",
                        lambda model: (AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(factscope.models, "load_model", lambda *a, **k: pytest.fail("a remote run loaded weights"))
    return stages


def test_remote_ablate_equals_the_local_checks_and_costs_its_plan(tiny, monkeypatch, tmp_path):
    """analyze --remote, then ablate --remote --method atp on its run: the knockout, mechanism-grid, noise,
    extraction-rate, enrichment, path-ablation and AtP-agreement tables are the local bf16 checks' bit for bit over
    the same prompts (the grid, noise, enrichment and paths with the run's R_r; noise at the scales and seeds
    given; the sampled paths ablated by full passes, as `kv_cache=False`), and the requests, bytes back and noise
    draws sent that the engine counted are the plan's exactly."""
    import functools

    from factscope import stage_io
    from factscope.causal import (ablation, atp_paths, enrichment, extraction, knockout, noise, spread,
                                  taxonomy_paths)

    folder = tiny[0]
    local_model = load_model(str(folder), dtype="bfloat16")
    engines = []
    stages = _remote_stages(monkeypatch, folder, engines)
    run = stages.analyze("org/tiny", None, tmp_path / "run", remote=True, all_prompts=True, report=False)
    scales, seeds = [0.0, 1.0], [0]
    plan = stages.remote_ablate_plan(run.path, window=3, noise_scales=scales, seeds=seeds, method="atp", limit=12)
    run = stages.ablate(run.path, remote=True, window=3, noise_scales=scales, seeds=seeds, method="atp", limit=12,
                        report=False)
    monkeypatch.setattr(atp_paths, "exact_path_effects", functools.partial(atp_paths.exact_path_effects, kv_cache=False))
    known = spread(encode_all(load_facts(), local_model.tokenizer, local_model.prepend_bos), 12)
    head_sets, blocked = knockout.class_head_sets(run.heads), knockout.blocked_groups(local_model.prepend_bos)
    targets = stage_io.run_targets(run.path, stage_io.QUIET)
    mechanisms = taxonomy_paths(run.heads, local_model.cfg.n_layers)
    expected = {
        **knockout.CHECK.run(local_model, known, progress=None, window=3, head_sets=head_sets, blocked=blocked),
        **ablation.CHECK.run(local_model, known, progress=None, mode="mean", targets=targets, mechanisms=mechanisms),
        **noise.CHECK.run(local_model, known, progress=None, mechanisms=mechanisms, noise_scales=scales, seeds=seeds,
                          targets=targets),
        **extraction.CHECK.run(local_model, known, progress=None),
        **enrichment.CHECK.run(local_model, known, progress=None, targets=targets),
        **atp_paths.CHECK.run(local_model, known, progress=None, mode="mean", targets=targets, method="atp",
                              **atp_paths.path_sizes(local_model)),
    }
    for name, table in expected.items():
        pd.testing.assert_frame_equal(table, getattr(run, name), check_exact=True, check_dtype=False)
    ablate = run.summary["causal"]["ablate"]
    remote_checks = ["knockout", "ablations", "noise_robustness", "extraction_rate", "enrichment", "path_ablations"]
    assert ablate["remote"] == {"checks": remote_checks, "requests": plan.requests, "bytes_back": plan.bytes_back,
                                "bytes_sent": plan.bytes_sent}
    assert (ablate["remote"]["requests"], ablate["remote"]["bytes_back"], ablate["remote"]["bytes_sent"]) == (
        engines[-1].requests, engines[-1].bytes_back, engines[-1].bytes_sent)
    assert (ablate["noise_scales"], ablate["seeds"], plan.bytes_sent > 0) == (scales, seeds, True)
    passes = knockout.knockout_passes(3, blocked) + knockout.knockout_passes(3, blocked, heads=head_sets)
    assert (plan.prompts, plan.requests) == (12, passes + 4 + 2)  # all prompts analysed: no recall pass
    assert "MB of noise draws sent" in plan.describe()
    assert (run.path_ablations["method"] == "exact").sum() == int(atp_paths.sample_paths(
        atp_paths.atp_path_effects(local_model, known, targets=targets)[0]).sum())
    assert set(remote_checks) <= set(run.summary["causal"]) and ablate["method"] == "atp"


def test_remote_ablate_refusals_are_one_line(tiny, monkeypatch, tmp_path):
    from factscope import stages

    folder = tiny[0]
    local = stages.analyze(str(folder), None, tmp_path / "local", all_prompts=True, report=False)
    with pytest.raises(FactscopeError, match="analysed locally; ablate --remote checks a run of `analyze --remote`"):
        stages.ablate(local.path, remote=True)
    with pytest.raises(FactscopeError, match=r"^ablate method 'gradients': use exact, atp, both$"):
        stages.ablate(local.path, remote=True, method="gradients")


@pytest.mark.real
def test_knockout_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path: every window of `ablate`'s knockout (END↛subject and
    END↛relation) and two head sets, on 8 known facts, bit for bit."""
    from factscope.causal import knockout, known_facts, spread

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    known = spread(known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos)), 8)
    engine = local_engine("smollm2-135m", remote="local")
    sets = {"subject_heads": [(14, 3), (20, 1)], "relation_heads": [(25, 0), (28, 7)]}
    for options in ({"window": knockout.WINDOW}, {"heads": sets}):
        expected = knockout.knockout(model, known, **options)
        got = knockout.knockout(model, known, **options, engine=engine)
        pd.testing.assert_frame_equal(expected, got, check_exact=True)


@pytest.mark.real
def test_extraction_and_enrichment_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path, on 8 known facts: the extraction-rate table (every layer and
    sublayer, both projections) and the enrichment table (the lens at the last subject token) bit for bit."""
    from factscope.causal import enrichment, extraction, known_facts, spread

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    known = spread(known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos)), 8)
    engine = local_engine("smollm2-135m", remote="local")
    pd.testing.assert_frame_equal(extraction.extraction_rate(model, known),
                                  extraction.extraction_rate(model, known, engine=engine), check_exact=True)
    pd.testing.assert_frame_equal(enrichment.subject_enrichment(model, known),
                                  enrichment.subject_enrichment(model, known, engine=engine), check_exact=True)


def _smollm2_mechanisms():
    """SmolLM2 in fp32, 8 of its known facts, its engine through the serialisation path, and two head sets and every
    MLP as mechanisms: what the real tests of the ablate sessions check."""
    from factscope.causal import known_facts, spread
    from factscope.causal.sites import HeadPath, MlpPath

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    known = spread(known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos)), 8)
    engine = local_engine("smollm2-135m", remote="local")
    mechanisms = {"subject_heads": [HeadPath(14, 3, "subject"), HeadPath(20, 1, "subject")],
                  "relation_heads": [HeadPath(25, 0, "relation"), HeadPath(28, 7, "relation")],
                  "mlps": [MlpPath(layer) for layer in range(model.cfg.n_layers)]}
    return model, known, engine, mechanisms


@pytest.mark.real
def test_mechanism_grid_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path, on 8 known facts: the mean-ablation grid (two head sets and
    every MLP; alone, in pairs, together; total and direct effects) in one session, bit for bit."""
    from factscope.causal import ablation

    model, known, engine, mechanisms = _smollm2_mechanisms()
    pd.testing.assert_frame_equal(ablation.ablation_grid(model, known, mechanisms),
                                  ablation.ablation_grid(model, known, mechanisms, engine=engine), check_exact=True)
    assert engine.requests == 1


@pytest.mark.real
def test_noise_check_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path, on 8 known facts: the noise check on two head sets and every
    MLP (and all together), three scales, two seeds, in one session from the local draws, bit for bit."""
    from factscope.causal import noise

    model, known, engine, mechanisms = _smollm2_mechanisms()
    scales, seeds = (0.0, 1.0, 4.0), (0, 1)
    expected = noise.noise_robustness(model, known, mechanisms, scales, seeds)
    got = noise.noise_robustness(model, known, mechanisms, scales, seeds, engine=engine)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert expected["accuracy"].nunique() > 1  # the noise changed something
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == noise.CHECK.remote_cost(
        model.cfg.n_layers, known, mechanisms=mechanisms, noise_scales=scales, seeds=seeds, targets=None,
        **noise.draw_sizes(model))


@pytest.mark.real
def test_path_atp_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path, on 8 known facts: path AtP of every head path and MLP (total and
    direct) in one session, and the exact check of its first 3 sampled paths of each kind in the grid session (the
    whole sample is the tiny models' test: ~240 full passes here), bit for bit, with R_r from every fact (8 facts
    alone leave most relations without another attribute)."""
    from factscope.data import relation_targets

    model, known, engine, _ = _smollm2_mechanisms()
    targets = relation_targets(encode_all(load_facts(), model.tokenizer, model.prepend_bos))
    _path_atp_through_the_engine(model, model, known, engine, "mean", "atp", targets, per_kind=3)


def test_cli_ablate_dry_run_prints_the_plan_and_sends_nothing(tiny, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from factscope import cli

    stages = _remote_stages(monkeypatch, tiny[0], [])
    run = stages.analyze("org/tiny", None, tmp_path / "run", remote=True, all_prompts=True, report=False)
    monkeypatch.setattr(remote, "remote_engine", lambda *a: pytest.fail("a dry run built an engine"))
    result = CliRunner().invoke(cli.app, ["ablate", str(run.path), "--remote", "--dry-run", "--limit", "12",
                                          "--window", "3"])
    assert result.exit_code == 0, result.output
    plan = stages.remote_ablate_plan(run.path, window=3, limit=12)
    printed = " ".join(result.output.split())  # the console wraps the line at its width
    assert plan.describe() in printed and "12 prompts" in printed
    assert not run.path.joinpath("knockout.csv").exists()
    result = CliRunner().invoke(cli.app, ["ablate", str(run.path), "--remote", "--dry-run", "--limit", "12",
                                          "--window", "3", "--method", "both"])
    assert result.exit_code == 0, result.output
    both = stages.remote_ablate_plan(run.path, window=3, method="both", limit=12)
    assert both.describe() in " ".join(result.output.split()) and both.requests == plan.requests + 2
    assert not run.path.joinpath("path_ablations.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# trace --remote: causal tracing in one nnsight session per seed

@pytest.mark.parametrize(("family", "remote"), [("llama", False), ("llama", "local"), ("gemma3", "local"),
                                                 ("qwen2", "local")])
def test_causal_trace_through_the_engine_equals_local_full_width_tracing_bitwise(model_dirs, family, remote):
    """The clean, corrupted and restoration passes of a seed run in one session, from the local noise draws, and
    the effects are the local full-width ones (`kv_cache=False`), in chunks as the local passes chunk them: bit for
    bit here (same functions, same fp32 tensors, same CPU); the tiny models' effects are small (~1e-4), so a
    tolerance would not tell a wrong restoration from rounding."""
    from factscope.causal.trace import trace_effects

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    engine = local_engine(str(folder), remote=remote)
    options = {"seeds": (0, 1), "window": 2, "max_rows": 16}
    expected = trace_effects(model, encoded, kv_cache=False, **options)
    got = trace_effects(config_only(folder, engine), encoded, engine=engine, **options)
    assert (expected.effects != 0).any()
    for name in ("effects", "p_clean", "p_corrupted", "noise_std"):
        assert torch.equal(torch.as_tensor(getattr(got, name)), torch.as_tensor(getattr(expected, name))), name
    assert engine.requests == 2  # one session per seed


def _full_width_atp(model, encoded, noise: float, seeds, window: int, graddrop: bool) -> torch.Tensor:
    """AtP of causal tracing (or GradDrop) by its definition, every prompt at full width through TransformerLens:
    per seed one plain forward from the noisy embeddings (a leaf), or with GradDrop one per layer ℓ in which layer
    ℓ's attention and MLP outputs are handed on as new leaves (their own gradient is kept, nothing flows back through
    them); per kind and layer (clean − corrupted) · ∂Σp(a)/∂state summed over d_model, summed over the restored
    window; GradDrop Σ_ℓ |·| / (L − 1). [seed, kind, layer, batch, pos], zero outside the restorable cells."""
    from factscope.causal import atp
    from factscope.causal.trace import _RESTORED, TRACE_KINDS, _clean_states, restored_layers, subject_noise
    from factscope.forward import act_name, make_batch

    batch = make_batch(model, encoded)
    n_layers = model.cfg.n_layers
    clean, std = _clean_states(model, batch, TRACE_KINDS)
    names = {kind: [act_name(_RESTORED[kind], layer) for layer in range(n_layers)] for kind in TRACE_KINDS}
    out = torch.zeros((len(seeds), len(TRACE_KINDS), n_layers, *batch.tokens.shape))
    for s, seed in enumerate(seeds):
        corruption = subject_noise(batch, noise * std, seed, model.cfg.d_model)
        for dropped in (range(n_layers) if graddrop else (None,)):
            store = {}
            hooks = [(act_name("embed"), lambda x, hook: (x + corruption).detach().requires_grad_(True)),
                     *((act_name(site, dropped), lambda x, hook: x.detach().requires_grad_(True))
                       for site in ("attn_out", "mlp_out") if dropped is not None),
                     *((name, lambda x, hook, name=name: store.__setitem__(name, x)) for kind in TRACE_KINDS
                       for name in names[kind]),
                     (act_name("final_out"), lambda x, hook: store.__setitem__("normed", x[batch.rows, batch.ends]))]
            with torch.enable_grad():
                model.bridge.run_with_hooks(batch.tokens, attention_mask=batch.mask, fwd_hooks=hooks)
                p = (store["normed"] @ model.W_U + model.b_U).float().softmax(-1)[batch.rows, batch.answers]
                every = [name for kind in TRACE_KINDS for name in names[kind]]
                grads = dict(zip(every, torch.autograd.grad(p.sum(), [store[name] for name in every])))
            for k, kind in enumerate(TRACE_KINDS):
                single = [((clean[name] - store[name].detach()) * grads[name]).sum(-1) for name in names[kind]]
                for layer in range(n_layers):
                    first, last = restored_layers(kind, layer, window, n_layers)
                    estimate = torch.stack(single[first : last + 1]).sum(0)
                    if graddrop:
                        out[s, k, layer] += estimate.abs() / (n_layers - 1)
                    else:
                        out[s, k, layer] = estimate
    return out * atp._restorable(batch)


@pytest.mark.parametrize(("family", "remote", "graddrop"), [
    ("llama", False, False), ("llama", "local", True), ("qwen2", "local", False), ("qwen2", False, True),
    ("gemma3", "local", False), ("gemma3", "local", True)])
def test_trace_atp_through_the_engine_equals_the_full_width_definition(model_dirs, family, remote, graddrop):
    """`trace --method atp [--graddrop]` through the engine: one session (the clean pass, then per seed and chunk of
    prompts a corrupted pass and its backward passes, GradDrop cutting the gradient at the dropped layer's attention
    and MLP outputs), from the local noise draws, gives the full-width definition of AtP (GradDrop) bit for bit
    with the 12 prompts in one chunk (the definition's batch), within 1e-9 in chunks of 5, and the local AtP (the
    subject-to-END tokens only, the prefix as clean keys and values) within 1e-6; p_clean, p_corrupted and the noise
    std are the local ones; each call costs the one session `atp.CHECK.remote_cost` counts per estimate."""
    from factscope.causal import atp

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    engine = local_engine(str(folder), remote=remote)
    options = {"noise": 3.0, "seeds": (0, 1), "window": 2, "graddrop": graddrop}
    got = atp.atp_trace(config_only(folder, engine), encoded, engine=engine, chunk=16, **options)
    expected = _full_width_atp(model, encoded, 3.0, (0, 1), 2, graddrop)
    assert (expected.abs() > 1e-5).any() and (expected >= 0).all() == graddrop
    assert torch.equal(got.effects, expected)
    chunked = atp.atp_trace(config_only(folder, engine), encoded, engine=engine, chunk=5, **options)
    torch.testing.assert_close(chunked.effects, expected, rtol=0, atol=1e-9)  # other batch shapes: other rounding
    local = atp.atp_trace(model, encoded, **options)
    torch.testing.assert_close(got.effects, local.effects, rtol=0, atol=1e-6)
    for name in ("p_clean", "p_corrupted"):
        torch.testing.assert_close(getattr(got, name), getattr(local, name), rtol=0, atol=1e-7)
    assert got.noise_std == local.noise_std
    requests, bytes_back, bytes_sent = atp.CHECK.remote_cost(model.cfg.n_layers, encoded, seeds=(0, 1), method="both",
                                                             graddrop=False, d_model=model.cfg.d_model)
    exact = atp.trace_remote_cost(model.cfg.n_layers, encoded, (0, 1), model.cfg.d_model)
    session = (requests - exact[0], bytes_back - exact[1], bytes_sent - exact[2])
    assert (engine.requests, engine.bytes_back, engine.bytes_sent) == tuple(2 * part for part in session)  # 2 calls


@pytest.mark.parametrize(("family", "remote"), [("llama", "local"), ("gemma3", False)])
def test_trace_atp_check_through_the_engine(model_dirs, family, remote):
    """The trace check with --method atp --graddrop through the engine: AtP and GradDrop one session each, the
    sampled exact check one session per seed restoring only the sampled cells, full width: those cells' effects
    are the local full-width trace's (`kv_cache=False`) bit for bit, seed by seed; the requests and noise draws
    sent are the plan's, and the bytes back the plan's bound less 4 bytes per seed for each cell counted there
    that needs no pass (the residual after the last block) or that both estimators sampled."""
    from factscope.causal import atp
    from factscope.causal.trace import trace_effects
    from factscope.forward import make_batch

    folder = model_dirs[family]
    model = load_model(str(folder))
    encoded = encode_all(load_facts()[:12], model.tokenizer, model.prepend_bos)
    engine = local_engine(str(folder), remote=remote)
    remote_model = config_only(folder, engine)
    estimate = atp.atp_trace(remote_model, encoded, seeds=(0,), window=2, engine=engine)
    cells = atp.sample_cells(estimate.effects.mean(0), atp._restorable(make_batch(model, encoded)))
    full = trace_effects(model, encoded, seeds=(0,), window=2, kv_cache=False, kinds=estimate.kinds).effects[0]
    got = atp.exact_cells(remote_model, estimate, cells, (0,), 3.0, engine=engine)
    assert torch.equal(got[cells], full[cells]) and (got[cells] != 0).any() and (got[~cells] == 0).all()

    engine = local_engine(str(folder), remote=remote)
    seeds = (0, 1)
    tables = atp.CHECK.run(remote_model, encoded, progress=None, noise=3.0, window=2, seeds=seeds, method="atp",
                           graddrop=True, d_model=model.cfg.d_model, engine=engine)
    local = atp.CHECK.run(model, encoded, progress=None, noise=3.0, window=2, seeds=seeds, method="atp",
                          graddrop=True, d_model=model.cfg.d_model)
    pd.testing.assert_frame_equal(tables["atp_trace"], local["atp_trace"], check_exact=False, rtol=0, atol=1e-6)
    assert list(tables["atp_agreement"]["estimator"].unique()) == ["atp", "graddrop"]
    # Spearman ranks a tiny random model's near-zero exact effects, whose order moves with float rounding (the
    # engine's exact passes are full width, the local ones resumed): it gets an absolute tolerance
    ranks = ["spearman"]
    pd.testing.assert_frame_equal(tables["atp_agreement"].drop(columns=ranks), local["atp_agreement"].drop(columns=ranks),
                                  check_exact=False, rtol=1e-4)
    pd.testing.assert_frame_equal(tables["atp_agreement"][ranks], local["atp_agreement"][ranks], check_exact=False,
                                  rtol=0, atol=1e-3)
    estimates = [atp.atp_trace(model, encoded, seeds=seeds, window=2, graddrop=graddrop) for graddrop in (False, True)]
    restorable = atp._restorable(make_batch(model, encoded))
    samples = [atp.sample_cells(e.effects.mean(0), restorable) for e in estimates]
    union = samples[0] | samples[1]
    no_pass = int(union[0, -1].sum())  # resid is the first kind; after the last block nothing is run
    counted = sum(int(sample.sum()) for sample in samples)
    requests, bytes_back, bytes_sent = atp.CHECK.remote_cost(model.cfg.n_layers, encoded, seeds=seeds, method="atp",
                                                             graddrop=True, d_model=model.cfg.d_model)
    assert (engine.requests, engine.bytes_sent) == (2 + len(seeds), bytes_sent) and requests == engine.requests
    assert engine.bytes_back == bytes_back - 4 * len(seeds) * (counted - int(union.sum()) + no_pass)


def test_remote_trace_equals_local_full_width_tracing_and_costs_its_plan(tiny, monkeypatch, tmp_path):
    """analyze --remote, then trace --remote on its run (NDIF: the tiny model in bf16 through nnsight's serialisation
    path): the causal_trace table is the local bf16 full-width tracing's over the same prompts and noise draws,
    and the requests and bytes both ways are the plan's exactly."""
    from factscope.causal import spread
    from factscope.causal.trace import trace_effects, trace_table

    folder = tiny[0]
    local_model = load_model(str(folder), dtype="bfloat16")
    engines = []
    stages = _remote_stages(monkeypatch, folder, engines)
    run = stages.analyze("org/tiny", None, tmp_path / "run", remote=True, all_prompts=True, report=False)
    plan = stages.remote_trace_plan(run.path, seeds=[0, 1], limit=6, window=2)
    run = stages.trace(run.path, remote=True, seeds=[0, 1], window=2, limit=6, report=False)
    known = spread(encode_all(load_facts(), local_model.tokenizer, local_model.prepend_bos), 6)
    expected = trace_table(trace_effects(local_model, known, seeds=(0, 1), window=2, kv_cache=False))
    pd.testing.assert_frame_equal(expected, run.causal_trace, check_exact=False, rtol=0, atol=1e-6)
    trace = run.summary["causal"]["trace"]
    assert trace["remote"] == {"requests": plan.requests, "bytes_back": plan.bytes_back,
                               "bytes_sent": plan.bytes_sent}
    assert (plan.prompts, plan.requests) == (6, 2)  # all prompts analysed: no recall pass; one session per seed
    assert plan.bytes_sent == 2 * sum(len(item.subject_positions) for item in known) * 32 * 4


@pytest.mark.parametrize(("method", "graddrop"), [("atp", True), ("both", False)])
def test_remote_trace_atp_equals_the_local_check_and_costs_its_plan(tiny, monkeypatch, tmp_path, method, graddrop):
    """analyze --remote, then trace --remote --method atp|both on its run (NDIF: the tiny model in bf16 through
    nnsight's serialisation path): the atp_trace table is the local bf16 AtP's within 1e-6 (full width there, the
    subject-to-END tokens here), the exact tables (with `both`) the local full-width tracing's, the agreement the
    local check's; the requests and the noise draws sent are the plan's, and so are the bytes back with `both`
    (with `atp` the plan's bound, checked in `test_trace_atp_check_through_the_engine`)."""
    from factscope.causal import atp, spread
    from factscope.causal.trace import trace_effects, trace_table

    folder = tiny[0]
    local_model = load_model(str(folder), dtype="bfloat16")
    engines = []
    stages = _remote_stages(monkeypatch, folder, engines)
    run = stages.analyze("org/tiny", None, tmp_path / "run", remote=True, all_prompts=True, report=False)
    plan = stages.remote_trace_plan(run.path, seeds=[0, 1], limit=6, method=method, graddrop=graddrop, window=2)
    run = stages.trace(run.path, remote=True, seeds=[0, 1], window=2, limit=6, method=method, graddrop=graddrop,
                       report=False)
    known = spread(encode_all(load_facts(), local_model.tokenizer, local_model.prepend_bos), 6)
    local = atp.CHECK.run(local_model, known, progress=None, noise=3.0, window=2, seeds=(0, 1), method=method,
                          graddrop=graddrop)
    pd.testing.assert_frame_equal(local["atp_trace"], run.atp_trace, check_exact=False, rtol=0, atol=1e-6)
    # Spearman ranks the tiny model's near-zero exact effects, whose order moves with bf16 rounding (the remote
    # exact passes are full width, the local ones resumed in passes of their own shapes): an absolute tolerance
    ranks = ["spearman"]
    pd.testing.assert_frame_equal(local["atp_agreement"].drop(columns=ranks), run.atp_agreement.drop(columns=ranks),
                                  check_exact=False, rtol=1e-3)
    pd.testing.assert_frame_equal(local["atp_agreement"][ranks], run.atp_agreement[ranks], check_exact=False, rtol=0,
                                  atol=5e-3)
    if method == "both":
        expected = trace_table(trace_effects(local_model, known, seeds=(0, 1), window=2, kv_cache=False))
        pd.testing.assert_frame_equal(expected, run.causal_trace, check_exact=False, rtol=0, atol=1e-6)
    trace = run.summary["causal"]["trace"]
    counted = (engines[-1].requests, engines[-1].bytes_back, engines[-1].bytes_sent)
    assert (trace["remote"]["requests"], trace["remote"]["bytes_back"], trace["remote"]["bytes_sent"]) == counted
    assert (counted[0], counted[2]) == (plan.requests, plan.bytes_sent) and counted[1] <= plan.bytes_back
    assert counted[1] == plan.bytes_back or method == "atp"
    assert plan.requests == 1 + graddrop + 2  # an estimate: one session; the exact trace or check: one per seed
    assert trace["method"] == method and trace["graddrop"] == graddrop


def test_remote_trace_refusals_are_one_line(tiny, tmp_path):
    from factscope import stages

    local = stages.analyze(str(tiny[0]), None, tmp_path / "local", all_prompts=True, report=False)
    with pytest.raises(FactscopeError, match="analysed locally; trace --remote checks a run of `analyze --remote`"):
        stages.trace(local.path, remote=True)
    with pytest.raises(FactscopeError, match=r"^unknown trace method 'gradients' \(use exact, atp, both\)$"):
        stages.trace(local.path, remote=True, method="gradients")
    with pytest.raises(FactscopeError, match=r"^unknown trace method 'gradients' \(use exact, atp, both\)$"):
        stages.remote_trace_plan(local.path, method="gradients")
    with pytest.raises(FactscopeError, match="^--graddrop corrects attribution patching: use it with --method atp or both$"):
        stages.remote_trace_plan(local.path, graddrop=True)


@pytest.mark.real
def test_trace_atp_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path, on 4 known facts and one seed: AtP and GradDrop of every
    restoration (one session each, full width) equal their full-width definition bit for bit and the local AtP
    (subject-to-END tokens) within 1e-5: the local path's own rounding (estimates up to 0.57, 6e-6 apart at 41bde47,
    ~1e-5 relative), and the sampled exact check through the engine equals the local full-width trace on its
    cells within 1e-5 (its passes hold the sampled rows only, the trace's every row: other batch shapes, other
    rounding; 1.4e-6 apart at 41bde47)."""
    from factscope.causal import atp, known_facts, spread
    from factscope.causal.trace import trace_effects
    from factscope.forward import make_batch

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    known = spread(known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos)), 4)
    engine = local_engine("smollm2-135m", remote="local")
    for graddrop in (False, True):
        got = atp.atp_trace(model, known, seeds=(0,), graddrop=graddrop, engine=engine)
        assert torch.equal(got.effects, _full_width_atp(model, known, 3.0, (0,), 10, graddrop))
        torch.testing.assert_close(got.effects, atp.atp_trace(model, known, seeds=(0,), graddrop=graddrop).effects,
                                   rtol=0, atol=1e-5)
    cells = atp.sample_cells(got.effects.mean(0), atp._restorable(make_batch(model, known)))
    exact = atp.exact_cells(model, got, cells, (0,), 3.0, engine=engine)
    full = trace_effects(model, known, seeds=(0,), kv_cache=False, kinds=got.kinds).effects[0]
    torch.testing.assert_close(exact[cells], full[cells], rtol=0, atol=1e-5)
    assert engine.requests == 3 and (exact[cells].abs() > 1e-3).any()


def test_cli_trace_dry_run_prints_the_plan_and_sends_nothing(tiny, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from factscope import cli

    stages = _remote_stages(monkeypatch, tiny[0], [])
    run = stages.analyze("org/tiny", None, tmp_path / "run", remote=True, all_prompts=True, report=False)
    monkeypatch.setattr(remote, "remote_engine", lambda *a: pytest.fail("a dry run built an engine"))
    result = CliRunner().invoke(cli.app, ["trace", str(run.path), "--remote", "--dry-run", "--limit", "6",
                                          "--seeds", "0"])
    assert result.exit_code == 0, result.output
    plan = stages.remote_trace_plan(run.path, seeds=[0], limit=6)
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert plan.describe() in printed and "MB of noise draws sent" in printed
    assert not run.path.joinpath("causal_trace.parquet").exists()
    result = CliRunner().invoke(cli.app, ["trace", str(run.path), "--remote", "--dry-run", "--limit", "6", "--seeds",
                                          "0", "--method", "atp", "--graddrop"])
    assert result.exit_code == 0, result.output
    atp_plan = stages.remote_trace_plan(run.path, seeds=[0], limit=6, method="atp", graddrop=True)
    printed = " ".join(result.output.split())
    assert atp_plan.describe() in printed and "bytes back at most" in printed
    assert atp_plan.requests == 2 + 1  # AtP and GradDrop, one session each; the sampled exact check, one per seed
    assert not run.path.joinpath("atp_trace.parquet").exists()


def test_a_tracing_session_refused_or_unreachable_is_one_line(tiny, hub_engine, monkeypatch):
    """A session goes out through the same transport as a trace: its failures are the same one-line errors."""
    from factscope.causal.trace import trace_effects

    engine, (_, model, encoded, _) = hub_engine, tiny

    unreachable_ndif(monkeypatch)
    with pytest.raises(FactscopeError, match="cannot reach NDIF .*ConnectionRefusedError"), remote.one_line_errors():
        trace_effects(model, encoded[:2], seeds=(0,), engine=engine)

    refusing_ndif(monkeypatch)
    with pytest.raises(FactscopeError, match="NDIF refused or failed the request: .*Invalid API key"), \
            remote.one_line_errors():
        trace_effects(model, encoded[:2], seeds=(0,), engine=engine)
    assert engine.requests == 0


@pytest.mark.real
def test_causal_trace_through_the_engine_on_smollm2():
    """SmolLM2, fp32, through the serialisation path: one seed's session on 2 known facts equals the local
    full-width tracing within 1e-6 on every (kind, layer, prompt, position)."""
    from factscope.causal import known_facts, spread
    from factscope.causal.trace import trace_effects

    torch.set_num_threads(1)
    model = load_model("smollm2-135m")
    known = spread(known_facts(model, encode_all(load_facts(), model.tokenizer, model.prepend_bos)), 2)
    engine = local_engine("smollm2-135m", remote="local")
    expected = trace_effects(model, known, seeds=(0,), kv_cache=False)
    got = trace_effects(model, known, seeds=(0,), engine=engine)
    torch.testing.assert_close(got.effects, expected.effects, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.p_corrupted, expected.p_corrupted, rtol=0, atol=1e-6)
    assert engine.requests == 1
