"""Running the decomposition's forward passes on NDIF (the National Deep Inference Fabric) through nnsight: the
checks made before anything is sent, the cost plan, and one-line errors for what goes wrong on the way.

Nothing here is a distribution layer: the pass is `nnsight_engine`'s, sent with `remote=True`, and only the END
tensors it saves come back. NDIF builds the model from its Hub id (the client holds it on the meta device), so a
remote run needs a Hub id, an API key (`NDIF_API_KEY`), and the nnsight version the server speaks. Every check
here runs before a run directory is touched, so a refused run leaves nothing half-written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import FactscopeError
from .models import NAMED_MODELS
from .taxonomy import GROUPS

NNSIGHT_VERSION = "0.8.1"  # the one pinned by the `remote` extra; NDIF refuses clients it does not speak to
# NDIF runs each model as deployed, in bf16: a request cannot ask for another dtype, and no fp32 copy exists there
SERVED_DTYPE = "bfloat16"


@dataclass(frozen=True)
class Shape:
    """The sizes of a model that decide what a remote run sends back (from its Hugging Face config)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Shape:
        heads = config.num_attention_heads
        d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads, d_head,
                   config.hidden_size, config.vocab_size)


@dataclass(frozen=True)
class Plan:
    model: str
    prompts: int
    requests: int  # one trace per batch
    bytes_back: int
    bytes_sent: int = 0  # tensors the client sends besides the prompts' token ids (the noise draws of causal tracing
    # and of the noise check)
    note: str = ""  # what the plan covers, where a command runs only part of its work remotely

    def describe(self) -> str:
        sent = f", {self.bytes_sent / 1e6:.2f} MB of noise draws sent" if self.bytes_sent else ""
        note = f"; {self.note}" if self.note else ""
        return (f"remote plan for {self.model}: {self.prompts} prompts in {self.requests} request"
                f"{'s' * (self.requests != 1)}, {self.bytes_back / 1e6:.2f} MB back{sent}{note}")


GROUP_COUNT = len(GROUPS)  # the source groups a head's contribution is split over
RECALL_BYTES = 8 + 4 + 4 + 5 * 8  # per prompt: rank (int64), probability, logit (fp32), the top 5 token ids (int64)
LENS_BYTES = 8 + 4 + 4 + 8  # per kept prompt and layer: rank, log-probability, logit, top token


def plan(model: str, shape: Shape, target_widths: Sequence[int], batch_size: int) -> Plan:
    """What `nnsight_engine.NnsightEngine.project` sends back, counted per batch: `decompose.EndParts`, all computed
    on the server. Per prompt and target (the batch's widest R_r, plus the vocabulary's average column), in fp32:
    every head's contribution by source group and in total, each layer's attention bias and MLP, and four
    whole-model terms; then the recall statistics, and the logit lens per layer. The lens is counted for every
    prompt: with known facts only (the default) the unknown ones' lens is not sent, so this is an upper bound.
    No value vector, residual or weight comes back: the bytes no longer grow with the prompt length or d_model."""
    total = 0
    batches = [target_widths[i : i + batch_size] for i in range(0, len(target_widths), batch_size)]
    for batch in batches:
        b, columns = len(batch), max(batch) + 1
        per_prompt = 4 * columns * (shape.n_layers * (shape.n_heads * (GROUP_COUNT + 1) + 2) + 4)
        total += b * (per_prompt + RECALL_BYTES + 1 + shape.n_layers * LENS_BYTES)  # + 1: the kept flag
    return Plan(model, len(target_widths), len(batches), total)


def recall_plan(model: str, prompts: int, batch_size: int) -> Plan:
    """`NnsightEngine.recall`: the recall statistics only."""
    return Plan(model, prompts, -(-prompts // batch_size), prompts * RECALL_BYTES)


SCORE_BYTES = 3 * 4  # per prompt and causal pass: p(a), a's logit and top-1 correct, fp32 (`end_maths.answer_scores`)
SCORE_DIFF_BYTES = SCORE_BYTES + 4  # and a's logit − the mean of R_r ∖ a's
NOISE_SCORE_BYTES = SCORE_BYTES + 2 * 4  # and whether the model, and the noisy mechanism alone, rank a first in R_r


def causal_plan(model: str, recalled: int, recall_batch: int, prompts: int, passes: int, bytes_back: int,
                bytes_sent: int = 0, note: str = "") -> Plan:
    """`ablate --remote` and `trace --remote`: the recall passes that find the known facts among `recalled` prompts
    again (none when the run analysed every prompt), then the checks' `passes` over `prompts`, one request each,
    bringing back `bytes_back` and sent `bytes_sent` (noise draws; `causal.remote_ablate_cost`,
    `causal.remote_trace_cost`); `note` says what the plan covers."""
    recall = recall_plan(model, recalled, recall_batch)
    return Plan(model, prompts, recall.requests + passes, recall.bytes_back + bytes_back, bytes_sent, note=note)


def check_client() -> None:
    """nnsight installed, at the pinned version: the server rejects other versions after a long upload."""
    try:
        import nnsight
    except ImportError:
        raise FactscopeError("--remote needs nnsight: pip install 'factscope[remote]'") from None
    if nnsight.__version__ != NNSIGHT_VERSION:
        raise FactscopeError(f"--remote needs nnsight=={NNSIGHT_VERSION} (installed: {nnsight.__version__}); "
                             "pip install 'factscope[remote]'")


def check_dtype(dtype: str | None) -> str:
    """The dtype a remote run runs (and records): NDIF's. Asking for another is refused rather than ignored; the
    engine also checks, on every request, that the server did run the model in it."""
    if dtype not in (None, SERVED_DTYPE):
        raise FactscopeError(f"--remote runs the model in {SERVED_DTYPE}, the dtype NDIF serves it in; --dtype {dtype} "
                             f"cannot be honoured there (drop --dtype, or run locally)")
    return SERVED_DTYPE


def check_model_id(name: str) -> None:
    """A Hub id: NDIF builds the model from it; a local folder or GGUF file cannot be sent."""
    if name in NAMED_MODELS or name.endswith(".gguf") or Path(name).expanduser().exists() or name.count("/") != 1 \
            or name.startswith((".", "/", "~")):
        raise FactscopeError(f"--remote needs a Hugging Face Hub id such as meta-llama/Llama-3.1-70B, not {name!r} "
                             "(NDIF builds the model from its id; local weights cannot be sent)")


def api_key() -> str:
    key = os.environ.get("NDIF_API_KEY", "").strip()
    if not key:
        raise FactscopeError("--remote needs an NDIF API key: set NDIF_API_KEY (get one at https://login.ndif.us)")
    return key


def host() -> str:
    from nnsight import CONFIG

    return CONFIG.API.HOST


def check_hosted(model_id: str) -> None:
    """Ask NDIF which models it serves, in one GET (the transport boundary the tests mock)."""
    import httpx

    try:
        response = httpx.get(f"{host()}/status", timeout=httpx.Timeout(5.0, read=30.0))
        response.raise_for_status()
        deployments = response.json().get("deployments", {})
    except httpx.HTTPStatusError as err:
        raise FactscopeError(f"NDIF answered {err.response.status_code} to its status query; try again later") from None
    except httpx.HTTPError as err:
        raise FactscopeError(f"cannot reach NDIF at {host()} ({type(err).__name__}): check the network") from None
    except ValueError:
        raise FactscopeError(f"NDIF at {host()} sent a status that is not JSON; try again later") from None
    hosted = sorted({d.get("repo_id") for d in deployments.values() if isinstance(d, dict) and d.get("repo_id")})
    if model_id not in hosted:
        shown = ", ".join(hosted[:8]) + (" …" if len(hosted) > 8 else "")
        raise FactscopeError(f"NDIF does not host {model_id!r} now (hosted: {shown or 'none'})")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """What fails while a trace is sent or run on NDIF, as one line. The transport is a websocket (`/subscribe`,
    opened first) and an HTTP POST (httpx); socket errors are caught by kind, not as every OSError, so a full disk
    under the run directory is not reported as a network fault."""
    import socket

    import httpx
    import websocket
    from nnsight.intervention.backends.remote import RemoteError

    unreachable = (ConnectionError, TimeoutError, socket.gaierror, websocket.WebSocketException, httpx.TransportError)
    try:
        yield
    except RemoteError as err:
        message = str(err).splitlines()[0] if str(err) else "no detail"
        if isinstance(err.__cause__, httpx.TransportError):
            raise FactscopeError(f"cannot reach NDIF at {host()}: check the network ({message})") from None
        raise FactscopeError(f"NDIF refused or failed the request: {message}") from None
    except unreachable as err:
        raise FactscopeError(f"cannot reach NDIF at {host()} ({type(err).__name__}: {err}): check the network") from None
    except httpx.HTTPStatusError as err:  # the Hub's canonicalisation of the model id, before anything is sent
        raise FactscopeError(f"the request failed before it was sent ({err.response.status_code} from "
                             f"{err.request.url.host})") from None


def preflight(model_id: str, send: bool) -> None:
    """Everything checkable before a model or run directory is touched; `send=False` (a dry run) stays offline."""
    check_client()
    check_model_id(model_id)
    if send:
        key = api_key()
        from nnsight import CONFIG

        CONFIG.API.APIKEY = key  # nnsight reads its key from its own config
        check_hosted(model_id)


def remote_engine(model_id: str, tokenizer=None):
    """The nnsight engine over NDIF's copy of `model_id` (the client builds it on the meta device)."""
    import warnings

    import nnsight

    from .nnsight_engine import NnsightEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LanguageModel is deprecated")
        # eager attention: the attention module must return its probabilities (see nnsight_engine)
        lm = nnsight.LanguageModel(model_id, tokenizer=tokenizer, attn_implementation="eager", trust_remote_code=False)
    return NnsightEngine(lm, remote=True)
