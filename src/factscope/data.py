"""Fact datasets and token groups.

A fact is one prompt (`Fact: The Colosseum is in the country of`) whose answer is `" " + attribute`.
This module knows nothing of torch or models: it takes any Hugging Face *fast* tokenizer (it needs
character offsets) and returns plain Python lists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import FactscopeError
from .taxonomy import GROUPS

FIELDS = ("relation", "subject", "prompt", "attribute")
# A leading label such as "Fact:" or "Q:" before the subject is the prompt's prefix, not its relation.
PREFIX_PATTERN = re.compile(r"^\s*[^\s:]{1,20}:")


def shipped_dataset() -> Path:
    return Path(str(resources.files("factscope") / "data" / "facts.jsonl"))


@dataclass(frozen=True)
class Fact:
    prompt_id: str
    relation: str
    subject: str
    prompt: str
    attribute: str
    source: str  # the file it came from and its 1-based line, for error messages
    line: int

    @property
    def subject_span(self) -> tuple[int, int]:
        # The last occurrence: in "Fact: Paris is the capital of France. Paris ..." the later mention is the
        # one the model reads last before answering.
        start = self.prompt.rfind(self.subject)
        return start, start + len(self.subject)

    @property
    def prefix_end(self) -> int:
        match = PREFIX_PATTERN.match(self.prompt)
        return match.end() if match and match.end() <= self.subject_span[0] else 0


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """Read a JSONL or CSV fact file (rows: relation, subject, prompt, attribute, optional id)."""
    return read_dataset(path).facts


@dataclass(frozen=True)
class Dataset:
    """A fact file as one read of it saw it: the facts parsed and the sha256 of the very bytes they were parsed
    from, so a file edited while the model loads cannot leave run.json naming other facts than the tables hold."""

    path: Path
    sha256: str
    facts: list[Fact]


def read_dataset(path: str | Path | None = None) -> Dataset:
    path = Path(path) if path is not None else shipped_dataset()
    if not path.is_file():
        raise FactscopeError(f"{path}: dataset file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FactscopeError(f"{path}: cannot read ({err.strerror or err})") from None
    return Dataset(path, hashlib.sha256(raw).hexdigest(), _parse_facts(path, raw))


def _parse_facts(path: Path, raw: bytes) -> list[Fact]:
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's CSV export) is not part of the text
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise FactscopeError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    facts = [_fact(path, line, index, row) for index, (line, row) in enumerate(rows)]
    if not facts:
        raise FactscopeError(f"{path}: the dataset has no facts")
    _check_unique_ids(path, facts)
    return facts


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    # split on newlines only: str.splitlines() would also break inside strings at U+2028, form feeds, …
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise FactscopeError(f"{path}:{line}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise FactscopeError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        rows.append((line, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [name for name in FIELDS if name not in (reader.fieldnames or [])]
    if missing:
        raise FactscopeError(f"{path}:1: CSV header lacks column '{missing[0]}' (needs {', '.join(FIELDS)})")
    return [(reader.line_num, row) for row in reader]


STRIPPED = ("relation", "subject", "attribute")


def _fact(path: Path, line: int, index: int, row: dict) -> Fact:
    """One row as a Fact. Spaces around the relation, subject and attribute are stripped, the prompt is kept as
    written: factscope scores `" " + attribute`, so `" France"` would be scored as a lone space token, and a
    subject's surrounding spaces would add the neighbouring space tokens to its group. Stripping rather than
    refusing: the stripped text names the same thing (the subject still occurs in the prompt), and imported sets
    often carry such spaces (CounterFact's targets do)."""
    values = {}
    for name in FIELDS:
        value = row.get(name)
        if value is None:
            raise FactscopeError(f"{path}:{line}: field '{name}' is missing")
        if not isinstance(value, str):
            raise FactscopeError(f"{path}:{line}: field '{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise FactscopeError(f"{path}:{line}: field '{name}' is empty")
        _check_encodable(path, line, name, value)
        values[name] = value.strip() if name in STRIPPED else value
    if values["subject"] not in values["prompt"]:
        raise FactscopeError(f"{path}:{line}: field 'subject' ({values['subject']!r}) does not occur in the prompt")
    if not values["prompt"][values["prompt"].rfind(values["subject"]) + len(values["subject"]) :].strip():
        raise FactscopeError(f"{path}:{line}: field 'prompt' ends with the subject; the relation must follow it")
    row_id = row.get("id")
    if isinstance(row_id, str):
        _check_encodable(path, line, "id", row_id)
    prompt_id = str(index) if row_id is None or row_id == "" else str(row_id)
    return Fact(prompt_id=prompt_id, source=str(path), line=line, **values)


def _check_encodable(path: Path, line: int, name: str, value: str) -> None:
    """JSON's `\\ud800` escapes decode to a lone surrogate, which no tokenizer or file can take: refused here, by
    line, rather than as an encoding error after the model loaded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FactscopeError(f"{path}:{line}: field '{name}' holds an unpaired surrogate "
                             f"({value[err.start]!r} at character {err.start}); not text") from None


def _check_unique_ids(path: Path, facts: list[Fact]) -> None:
    seen: dict[str, int] = {}
    for fact in facts:
        if fact.prompt_id in seen:
            raise FactscopeError(
                f"{path}:{fact.line}: field 'id' {fact.prompt_id!r} repeats the id of line {seen[fact.prompt_id]}"
            )
        seen[fact.prompt_id] = fact.line


@dataclass
class Encoded:
    """One fact as token ids, with the group of every token and the attribute's scored token."""

    fact: Fact
    token_ids: list[int]
    groups: list[str]  # one of GROUPS per token
    attribute_token: int  # first token of the attribute as it follows the prompt
    attribute_n_tokens: int
    tokens: list[str] = field(default_factory=list)
    # every position whose characters overlap the subject's, position 0 included when the subject starts the
    # prompt (the `first` group there): what tracing corrupts and where its position kinds are counted
    subject_positions: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        return len(self.token_ids) - 1

    @property
    def multi_token(self) -> bool:
        return self.attribute_n_tokens > 1


def encode(fact: Fact, tokenizer, prepend_bos: bool, max_tokens: int | None = None) -> Encoded:
    """Tokenize a fact and give each token its group from character offsets.

    A token belongs to `subject` if its characters overlap the subject's, to `prefix` if it lies within the
    leading label (`Fact:`), to `bos` if it is the prepended BOS token, to `end` if it is the last token (END), else
    to `relation`. Position 0 of a prompt without BOS is `first` whatever its text: models use it as an attention
    sink (SmolLM2 gives it 0.55–0.85 of END's attention in most late layers), so a head reading it is not reading
    the subject or the prefix (Geva et al. record `is_subject_position_zero` for the same reason). The subject's
    own positions, position 0 included, are kept apart in `subject_positions`.
    `max_tokens` is the model's context: a longer prompt is refused rather than silently truncated or garbled.
    """
    enc = tokenizer(fact.prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    subject_start, subject_end = fact.subject_span
    groups = []
    for start, end in offsets:
        if start < subject_end and end > subject_start:
            groups.append("subject")
        elif end <= fact.prefix_end:
            groups.append("prefix")
        else:
            groups.append("relation")
    if groups[-1] == "subject":
        raise FactscopeError(f"{fact.source}:{fact.line}: field 'prompt' ends inside the subject's last token")
    subject_positions = [pos for pos, group in enumerate(groups) if group == "subject"]
    groups[-1] = "end"
    if prepend_bos:
        ids, groups = [tokenizer.bos_token_id, *ids], ["bos", *groups]
        subject_positions = [pos + 1 for pos in subject_positions]
    else:
        groups[0] = "first"
    if max_tokens is not None and len(ids) > max_tokens:
        raise FactscopeError(
            f"{fact.source}:{fact.line}: field 'prompt' (prompt_id {fact.prompt_id!r}) is {len(ids)} tokens long, "
            f"more than the model's context of {max_tokens} tokens"
        )
    attribute_ids = attribute_tokens(fact, tokenizer)
    if not attribute_ids:
        raise FactscopeError(f"{fact.source}:{fact.line}: field 'attribute' ({fact.attribute!r}) tokenizes to nothing")
    return Encoded(
        fact=fact,
        token_ids=ids,
        groups=groups,
        attribute_token=attribute_ids[0],
        attribute_n_tokens=len(attribute_ids),
        tokens=[tokenizer.decode([token]) for token in ids],  # readable text, not BPE's 'Ġ' spelling
        subject_positions=subject_positions,
    )


def attribute_tokens(fact: Fact, tokenizer) -> list[int]:
    """The tokens the model would emit after the prompt to say ` attribute`.

    Tokenizing the whole continuation and cutting off the prompt's tokens gives the token as the model
    sees it (SentencePiece and byte-level BPE differ on how a leading space is spelled). If the
    continuation merges across the prompt's end, fall back to tokenizing ` attribute` alone.
    """
    prompt_ids = tokenizer(fact.prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fact.prompt + " " + fact.attribute, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return list(full_ids[len(prompt_ids) :])
    return list(tokenizer(" " + fact.attribute, add_special_tokens=False)["input_ids"])


def encode_all(facts: list[Fact], tokenizer, prepend_bos: bool, max_tokens: int | None = None) -> list[Encoded]:
    return [encode(fact, tokenizer, prepend_bos, max_tokens) for fact in facts]


def token_table(encoded: list[Encoded]) -> list[dict]:
    """One record per token: `prompt_id, position, token, group, is_end` (for drill-down views)."""
    return [
        {"prompt_id": item.fact.prompt_id, "position": pos, "token": token, "group": group, "is_end": pos == item.end}
        for item in encoded
        for pos, (token, group) in enumerate(zip(item.tokens, item.groups))
    ]


def relation_targets(encoded: list[Encoded]) -> dict[str, dict[int, str]]:
    """R_r for each relation: its distinct attribute tokens, each named by the first attribute spelling it."""
    targets: dict[str, dict[int, str]] = {}
    for item in encoded:
        targets.setdefault(item.fact.relation, {}).setdefault(item.attribute_token, item.fact.attribute)
    return targets


def targets_table(targets: dict[str, dict[int, str]]) -> list[dict]:
    """R_r as rows (relation, target_token, attribute), the form a run directory keeps it in."""
    return [{"relation": relation, "target_token": token, "attribute": attribute}
            for relation, tokens in targets.items() for token, attribute in tokens.items()]


def targets_from_rows(rows) -> dict[str, dict[int, str]]:
    """`targets_table` read back (rows with relation, target_token, attribute), in the same order."""
    targets: dict[str, dict[int, str]] = {}
    for relation, token, attribute in rows:
        targets.setdefault(str(relation), {})[int(token)] = str(attribute)
    return targets


def single_target_relations(encoded: list[Encoded]) -> dict[str, str]:
    """Relations whose R_r has one attribute, with it: a − mean(R_r \\ a) is undefined there."""
    return {relation: next(iter(targets.values())) for relation, targets in relation_targets(encoded).items()
            if len(targets) == 1}


# ---------------------------------------------------------------------------------------------------------------
# Importers: prompt files users already have, as rows of factscope's JSONL format


@dataclass(frozen=True)
class ImportFormat:
    """Where a source format keeps each of factscope's fields, as dotted paths into one record."""

    id: str
    relation: str
    subject: str
    prompt: str
    attribute: str
    template: bool  # the prompt is a template with "{}" where the subject goes


IMPORT_FORMATS = {
    # ROME's known_1000.json (Meng et al. 2022): the prompt is given with its subject filled in
    "known_1000": ImportFormat("known_id", "relation_id", "subject", "prompt", "attribute", template=False),
    # CounterFact: the fact is the requested rewrite's true target
    "counterfact": ImportFormat(
        "case_id", "requested_rewrite.relation_id", "requested_rewrite.subject", "requested_rewrite.prompt",
        "requested_rewrite.target_true.str", template=True,
    ),
}


def import_facts(path: str | Path, format: str, prefix: str = "", limit: int | None = None) -> list[dict]:
    """Facts from a JSON list of known_1000 or CounterFact records, as rows `id, relation, subject, prompt, attribute`.

    The relation is the Wikidata relation id (P30), the id the record's own, the attribute the true target without
    surrounding spaces (factscope scores `" " + attribute`, as for the shipped set). `prefix` (e.g. `Fact:`, the
    shipped prompts' label) goes before every prompt, joined by one space; by default prompts are kept as they are.
    """
    path, prefix = Path(path), prefix.strip()
    if format not in IMPORT_FORMATS:
        raise FactscopeError(f"unknown import format {format!r}: use one of {', '.join(IMPORT_FORMATS)}")
    spec = IMPORT_FORMATS[format]
    rows, seen = [], {}
    for index, data in enumerate(_json_records(path)[:limit]):
        record = _Record(path, index, data)
        row = _import_row(record, spec, prefix)
        if row["id"] in seen:
            raise record.error(spec.id, f"({row['id']!r}) repeats the id of record {seen[row['id']]}")
        seen[row["id"]] = index
        rows.append(row)
    return rows


IMPORTED_KEYS = ("id", "relation", "subject", "prompt", "attribute")  # the keys of every row `import_facts` makes


def imported_facts_file(path: Path) -> bool:
    """Whether `path` looks like what `import-facts` writes (one JSON object with exactly its keys a line): the
    only file its --overwrite replaces."""
    try:
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return bool(rows) and all(isinstance(row, dict) and sorted(row) == sorted(IMPORTED_KEYS) for row in rows)


def facts_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_json(path: Path):
    """A JSON file, or one error line naming the file (and the line of a syntax error)."""
    if not path.is_file():
        raise FactscopeError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise FactscopeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FactscopeError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None


def _json_records(path: Path) -> list:
    records = read_json(path)
    if not isinstance(records, list):
        raise FactscopeError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise FactscopeError(f"{path}: the list has no records")
    return records


@dataclass(frozen=True)
class _Record:
    """One record of an imported list; its errors name the file, the record's 0-based index and the field."""

    path: Path
    index: int
    data: object

    def error(self, name: str, problem: str) -> FactscopeError:
        return FactscopeError(f"{self.path}: record {self.index}: field '{name}' {problem}")

    def get(self, name: str) -> object:
        if not isinstance(self.data, dict):
            raise FactscopeError(f"{self.path}: record {self.index}: expected a JSON object, got {type(self.data).__name__}")
        value = self.data
        for key in name.split("."):
            if not isinstance(value, dict) or key not in value:
                raise self.error(name, "is missing")
            value = value[key]
        return value

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(name, "is empty")
        return value

    def id(self, name: str) -> str:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise self.error(name, f"must be an integer or a non-empty string, got {value!r}")
        return str(value)


def _import_row(record: _Record, spec: ImportFormat, prefix: str) -> dict:
    prompt_id = record.id(spec.id)  # first: a file in the other format fails on it, which names the mix-up
    subject, prompt = record.text(spec.subject), record.text(spec.prompt)
    if spec.template:
        if "{}" not in prompt:
            raise record.error(spec.prompt, f"({prompt!r}) has no '{{}}' where the subject goes")
        prompt = prompt.replace("{}", subject)
    elif subject not in prompt:
        raise record.error(spec.prompt, f"({prompt!r}) does not contain the subject {subject!r}")
    if not prompt[prompt.rfind(subject) + len(subject) :].strip():
        raise record.error(spec.prompt, f"({prompt!r}) ends with the subject; the relation must follow it")
    return {
        "id": prompt_id,
        "relation": record.text(spec.relation),
        "subject": subject,
        "prompt": f"{prefix} {prompt}" if prefix else prompt,
        "attribute": record.text(spec.attribute).strip(),
    }
