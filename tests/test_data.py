"""Fact files (JSONL and CSV), their error messages, and token groups on the tiny byte-level tokenizer."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from factscope.data import (
    FIELDS,
    GROUPS,
    STRIPPED,
    Fact,
    attribute_tokens,
    encode,
    encode_all,
    load_facts,
    relation_targets,
    shipped_dataset,
    single_target_relations,
)
from factscope.errors import FactscopeError

COLOSSEUM = {
    "relation": "landmark_country",
    "subject": "The Colosseum",
    "prompt": "Fact: The Colosseum is in the country of",
    "attribute": "Italy",
}
EIFFEL = {
    "relation": "landmark_country",
    "subject": "The Eiffel Tower",
    "prompt": "Fact: The Eiffel Tower is in the country of",
    "attribute": "France",
}
PARIS = {
    "relation": "capital_city",
    "subject": "France",
    "prompt": "Fact: The capital of France is the city of",
    "attribute": "Paris",
}
TEMPLATE = "Fact: {subject} is in the country of"

# Text that load_facts and the tokenizer must round-trip; the line-break tests at the end cover "\n" and "\r".
LINE_BREAKS = "\n\r"
safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=LINE_BREAKS + ":"),
    min_size=1,
    max_size=24,
).filter(lambda s: s.strip())


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


def fact(subject: str, prompt: str, attribute: str = "Italy", relation: str = "r", prompt_id: str = "0") -> Fact:
    return Fact(prompt_id=prompt_id, relation=relation, subject=subject, prompt=prompt, attribute=attribute,
                source="<test>", line=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def offsets(tokenizer, prompt: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_jsonl_fields_and_prompt_ids(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [COLOSSEUM, {**EIFFEL, "id": "eiffel"}, PARIS, {**PARIS, "id": 7}])
    facts = load_facts(path)
    assert [f.prompt_id for f in facts] == ["0", "eiffel", "2", "7"]
    assert [f.line for f in facts] == [1, 2, 3, 4]
    assert all(f.source == str(path) for f in facts)
    for loaded, row in zip(facts, [COLOSSEUM, EIFFEL, PARIS, PARIS]):
        assert {name: getattr(loaded, name) for name in FIELDS} == row


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", ["", COLOSSEUM, "   ", EIFFEL])
    facts = load_facts(path)
    assert [f.subject for f in facts] == ["The Colosseum", "The Eiffel Tower"]
    assert [f.line for f in facts] == [2, 4]
    assert len({f.prompt_id for f in facts}) == 2


def test_csv_fields_and_prompt_ids(tmp_path):
    header = ["id", *FIELDS]
    rows = [
        ["", *COLOSSEUM.values()],
        ["eiffel", *EIFFEL.values()],
        ["", *PARIS.values()],
    ]
    facts = load_facts(write_csv(tmp_path / "facts.csv", header, rows))
    assert [f.prompt_id for f in facts] == ["0", "eiffel", "2"]
    assert [f.line for f in facts] == [2, 3, 4]
    assert [f.attribute for f in facts] == ["Italy", "France", "Paris"]


def test_csv_without_id_column_and_upper_case_suffix(tmp_path):
    header = ["attribute", "prompt", "subject", "relation", "note"]  # any column order, extra columns ignored
    rows = [[row["attribute"], row["prompt"], row["subject"], row["relation"], "x"] for row in (COLOSSEUM, EIFFEL)]
    facts = load_facts(write_csv(tmp_path / "FACTS.CSV", header, rows))
    assert [f.prompt_id for f in facts] == ["0", "1"]
    assert facts[1].prompt == EIFFEL["prompt"]


def test_default_is_the_shipped_dataset():
    facts = load_facts()
    assert facts == load_facts(shipped_dataset())
    assert len(facts) == 144
    assert len({f.prompt_id for f in facts}) == len(facts)
    assert len({f.relation for f in facts}) == 12
    colosseum = next(f for f in facts if f.subject == "The Colosseum")
    assert colosseum.prompt == COLOSSEUM["prompt"] and colosseum.attribute == "Italy"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(safe_text, safe_text, safe_text, st.one_of(st.none(), st.text(alphabet="abcxyz_-0123", min_size=1, max_size=6))),
        min_size=1,
        max_size=6,
    ),
    as_csv=st.booleans(),
)
def test_round_trip(tmp_path, rows, as_csv):
    records, seen = [], set()
    for index, (relation, subject, attribute, row_id) in enumerate(rows):
        prompt_id = str(index) if row_id is None else row_id
        assume(prompt_id not in seen)
        seen.add(prompt_id)
        records.append({"id": row_id, "relation": relation, "subject": subject,
                        "prompt": f"Fact: {subject} is in the country of", "attribute": attribute})
    if as_csv:
        path = write_csv(tmp_path / "rt.csv", ["id", *FIELDS],
                         [["" if r["id"] is None else r["id"], *(r[name] for name in FIELDS)] for r in records])
    else:
        path = write_jsonl(tmp_path / "rt.jsonl", [{k: v for k, v in r.items() if v is not None} for r in records])
    facts = load_facts(path)
    assert [{name: getattr(f, name) for name in FIELDS} for f in facts] == [
        {name: r[name].strip() if name in STRIPPED else r[name] for name in FIELDS} for r in records
    ]
    assert [f.prompt_id for f in facts] == [str(i) if r["id"] is None else r["id"] for i, r in enumerate(records)]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one FactscopeError naming the file, the 1-based line and the field


def _bad(**changes):
    row = dict(COLOSSEUM)
    for name, value in changes.items():
        if value is _DROP:
            del row[name]
        else:
            row[name] = value
    return row


_DROP = object()

JSONL_CASES = {
    "malformed JSON": ([COLOSSEUM, '{"relation": "r", "subject": '], 2, "JSON"),
    "non-object JSON": ([COLOSSEUM, EIFFEL, '["r", "s", "p", "a"]'], 3, "object"),
    "JSON string": ([COLOSSEUM, '"just text"'], 2, "object"),
    "missing field": ([COLOSSEUM, _bad(attribute=_DROP)], 2, "'attribute'"),
    "null field": ([_bad(relation=None)], 1, "'relation'"),
    "empty field": ([COLOSSEUM, EIFFEL, _bad(subject="")], 3, "'subject'"),
    "blank field": ([_bad(attribute="   ")], 1, "'attribute'"),
    "non-string field": ([COLOSSEUM, _bad(relation=5)], 2, "'relation'"),
    "list field": ([_bad(attribute=["Italy"])], 1, "'attribute'"),
    "subject not in prompt": ([COLOSSEUM, _bad(subject="The Pantheon")], 2, "'subject'"),
    "prompt ends with subject": ([_bad(prompt="Fact: it is The Colosseum")], 1, "'prompt'"),
    "prompt ends with subject and spaces": ([_bad(prompt="Fact: it is The Colosseum  ")], 1, "'prompt'"),
    "duplicate ids": ([{**COLOSSEUM, "id": "a"}, {**EIFFEL, "id": "b"}, {**PARIS, "id": "a"}], 3, "'id'"),
    "explicit id equal to another row's index": ([COLOSSEUM, {**EIFFEL, "id": "0"}], 2, "'id'"),
}


@pytest.mark.parametrize("rows, line, field", JSONL_CASES.values(), ids=JSONL_CASES.keys())
def test_bad_jsonl(tmp_path, rows, line, field):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(FactscopeError) as info:
        load_facts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:")
    assert field in message


def test_duplicate_id_names_the_first_line(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{**COLOSSEUM, "id": "x"}, EIFFEL, {**PARIS, "id": "x"}])
    with pytest.raises(FactscopeError, match=r"line 1\b"):
        load_facts(path)


CSV_CASES = {
    "missing header column": (["relation", "subject", "prompt"], [["r", "A", "Fact: A is", "x"]], 1, "'attribute'"),
    "short row": (list(FIELDS), [list(COLOSSEUM.values()), ["r", "A", "Fact: A is"]], 3, "'attribute'"),
    "empty field": (list(FIELDS), [["r", "", "Fact: A is", "x"]], 2, "'subject'"),
    "subject not in prompt": (list(FIELDS), [list(COLOSSEUM.values()), list(EIFFEL.values()), ["r", "Z", "Fact: A is", "x"]], 4, "'subject'"),
    "prompt ends with subject": (list(FIELDS), [["r", "A", "Fact: it is A", "x"]], 2, "'prompt'"),
    "duplicate ids": (["id", *FIELDS], [["k", *COLOSSEUM.values()], ["k", *EIFFEL.values()]], 3, "'id'"),
}


@pytest.mark.parametrize("header, rows, line, field", CSV_CASES.values(), ids=CSV_CASES.keys())
def test_bad_csv(tmp_path, header, rows, line, field):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(FactscopeError) as info:
        load_facts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:")
    assert field in message


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""),
    ("blank.jsonl", "\n  \n\n"),
    ("empty.csv", ""),
    ("header-only.csv", ",".join(FIELDS) + "\n"),
])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FactscopeError) as info:
        load_facts(path)
    assert str(path) in str(info.value)


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(COLOSSEUM) + "\n").encode() + json.dumps(_bad(subject="Zürich"), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(FactscopeError) as info:
        load_facts(path)
    assert str(info.value).startswith(f"{path}:")
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.csv", "missing-dir/facts.jsonl"])
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(FactscopeError) as info:
        load_facts(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Token groups


def check_groups(item, tokenizer, prepend_bos: bool) -> None:
    """The properties every encoded template prompt must have."""
    f = item.fact
    plain_ids = tokenizer(f.prompt, add_special_tokens=False)["input_ids"]
    spans = offsets(tokenizer, f.prompt)
    shift = 1 if prepend_bos else 0

    # the groups partition the tokens, and the tokens are the prompt's own (BOS first if asked)
    assert len(item.groups) == len(item.token_ids) == len(item.tokens) == len(plain_ids) + shift
    assert set(item.groups) <= set(GROUPS)
    assert item.token_ids[shift:] == plain_ids
    # position 0 is BOS, or the sink `first` without one; END is `end`; each once
    if prepend_bos:
        assert item.token_ids[0] == tokenizer.bos_token_id
    assert item.groups[0] == ("bos" if prepend_bos else "first")
    assert item.groups.count(item.groups[0]) == 1
    assert item.end == len(item.token_ids) - 1 and item.groups[item.end] == "end" and item.groups.count("end") == 1

    # the subject's positions are exactly the tokens overlapping its (last) occurrence, contiguous, covering it;
    # its group is those positions but position 0 (the sink)
    start, end = f.subject_span
    subject = [pos - shift for pos in item.subject_positions]
    assert subject == [i for i, (a, b) in enumerate(spans) if a < end and b > start]
    assert subject == list(range(subject[0], subject[-1] + 1))
    assert [pos for pos, g in enumerate(item.groups) if g == "subject"] == [p for p in item.subject_positions if p]
    covered = set()
    for i in subject:
        covered.update(range(*spans[i]))
    assert set(range(start, end)) <= covered

    # the label's tokens spell exactly "Fact:" (without BOS its first token is the sink)
    label = label_positions(item, shift)
    assert "".join(f.prompt[slice(*spans[i])] for i in label) == "Fact:"

    # the label leads (after BOS), and only relation tokens follow the subject up to END
    assert label == list(range(len(label)))
    assert set(item.groups[shift + subject[-1] + 1 : item.end]) <= {"relation"}


def label_positions(item, shift: int) -> list[int]:
    """Positions (BOS not counted) of the leading label: `prefix`, and `first` when it is not the subject."""
    return [pos - shift for pos, g in enumerate(item.groups)
            if g == "prefix" or (g == "first" and pos not in item.subject_positions)]


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_groups_of_shipped_facts(tokenizer, prepend_bos):
    facts = load_facts()
    for item in encode_all(facts, tokenizer, prepend_bos):
        check_groups(item, tokenizer, prepend_bos)


def test_colosseum_groups(tokenizer):
    item = encode(fact("The Colosseum", COLOSSEUM["prompt"]), tokenizer, prepend_bos=True)
    spans = offsets(tokenizer, COLOSSEUM["prompt"])
    text = {g: "".join(COLOSSEUM["prompt"][slice(*spans[i - 1])] for i, gg in enumerate(item.groups) if gg == g and i)
            for g in ("prefix", "subject", "relation", "end")}
    assert item.groups[0] == "bos" and item.groups.count("bos") == 1
    assert text == {"prefix": "Fact:", "subject": " The Colosseum", "relation": " is in the country", "end": " of"}


def test_bos_prepends_exactly_one_token(tokenizer):
    f = fact("The Colosseum", COLOSSEUM["prompt"])
    without, with_bos = encode(f, tokenizer, False), encode(f, tokenizer, True)
    assert "bos" not in without.groups and without.groups[0] == "first"
    assert with_bos.token_ids == [tokenizer.bos_token_id, *without.token_ids]
    assert with_bos.groups[0] == "bos" and "first" not in with_bos.groups
    assert with_bos.groups[2:] == without.groups[1:]  # position 0 is the sink only without BOS
    assert with_bos.subject_positions == [pos + 1 for pos in without.subject_positions]
    assert with_bos.tokens[0] == tokenizer.bos_token
    assert with_bos.attribute_token == without.attribute_token


def test_last_occurrence_of_a_repeated_subject(tokenizer):
    prompt = "Fact: Paris is big. Paris is in the country of"
    f = fact("Paris", prompt)
    second = prompt.rfind("Paris")
    assert f.subject_span == (second, second + len("Paris"))
    item = encode(f, tokenizer, False)
    spans = offsets(tokenizer, prompt)
    subject_chars = "".join(prompt[slice(*spans[i])] for i, g in enumerate(item.groups) if g == "subject")
    assert subject_chars.strip() == "Paris"
    first = [i for i, (a, b) in enumerate(spans) if a < prompt.find("Paris") + 5 and b > prompt.find("Paris")]
    assert all(item.groups[i] == "relation" for i in first)


def test_prompt_ending_inside_the_subjects_last_token(tmp_path, tokenizer):
    # "countr" ends before "y", so loading accepts it, but " country" is one token: END would be a subject token.
    assert len(tokenizer(" country", add_special_tokens=False)["input_ids"]) == 1
    path = write_jsonl(tmp_path / "f.jsonl", [COLOSSEUM, _bad(subject="countr", prompt="Fact: in the country")])
    f = load_facts(path)[1]
    with pytest.raises(FactscopeError) as info:
        encode(f, tokenizer, False)
    assert str(info.value).startswith(f"{path}:2:") and "'prompt'" in str(info.value)


def dropping_tokenizer(prompt: str):
    """A word-level fast tokenizer that splits on whitespace and deletes '§': ' §' tokenizes to nothing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", *dict.fromkeys(prompt.replace(":", " : ").split())])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace("§", "")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_attribute_that_tokenizes_to_nothing(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [COLOSSEUM, {**COLOSSEUM, "attribute": "§"}])
    tokenizer = dropping_tokenizer(COLOSSEUM["prompt"])
    good, bad = load_facts(path)  # "§" is not blank text, so loading accepts it
    assert encode(good, tokenizer, False).attribute_token == tokenizer.unk_token_id
    with pytest.raises(FactscopeError) as info:
        encode_all([good, bad], tokenizer, False)
    assert str(info.value).startswith(f"{path}:2:") and "'attribute'" in str(info.value)
    assert "tokenizes to nothing" in str(info.value)


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_prompt_longer_than_the_context(tmp_path, tokenizer, prepend_bos):
    rows = [COLOSSEUM, {**EIFFEL, "id": "long", "prompt": "Fact: The Eiffel Tower is in the country of " * 3}]
    facts = load_facts(write_jsonl(tmp_path / "f.jsonl", rows))
    lengths = [len(encode(f, tokenizer, prepend_bos).token_ids) for f in facts]
    limit = lengths[1] - 1
    assert len(encode_all(facts[:1], tokenizer, prepend_bos, max_tokens=lengths[0])) == 1  # a prompt may fill it
    with pytest.raises(FactscopeError) as info:
        encode_all(facts, tokenizer, prepend_bos, max_tokens=limit)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'f.jsonl'}:2:") and "'prompt'" in message and "'long'" in message
    assert f"{lengths[1]} tokens" in message and f"context of {limit} tokens" in message


def test_single_target_relations(tokenizer):
    facts = [
        fact("The Colosseum", COLOSSEUM["prompt"], "Italy", "landmark_country", "0"),
        fact("The Eiffel Tower", EIFFEL["prompt"], "France", "landmark_country", "1"),
        fact("France", PARIS["prompt"], "Paris", "capital_city", "2"),
        fact("Gaul", PARIS["prompt"].replace("France", "Gaul"), "Paris", "capital_city", "3"),
    ]
    assert single_target_relations(encode_all(facts, tokenizer, False)) == {"capital_city": "Paris"}
    assert single_target_relations(encode_all(facts[:2], tokenizer, False)) == {}


def test_subject_that_is_also_the_prefix_label(tokenizer):
    # The subject "Fact" also occurs as the label; the last occurrence is the subject, the label is the prefix.
    item = encode(fact("Fact", "Fact: Fact is in the country of"), tokenizer, False)
    check_groups(item, tokenizer, False)


def test_prompt_without_label_has_no_prefix(tokenizer):
    item = encode(fact("The Colosseum", "The Colosseum is in the country of"), tokenizer, False)
    assert "prefix" not in item.groups
    assert item.groups[0] == "first" and item.groups[-1] == "end"
    # the subject starts the prompt: position 0 is the sink, not the subject group, but still the subject's
    assert item.subject_positions[0] == 0 and item.groups[1] == "subject"
    assert encode(fact("The Colosseum", "The Colosseum is in the country of"), tokenizer, True).groups[1] == "subject"


def test_a_one_token_subject_at_position_zero_has_only_the_sink(tokenizer):
    item = encode(fact("Fact", "Fact is the capital of"), tokenizer, False)  # "Fact" is one token: every prompt has it
    assert item.subject_positions == [0] and "subject" not in item.groups


@settings(max_examples=150, deadline=None)
@given(subject=safe_text, prepend_bos=st.booleans())
@example(subject="The Colosseum", prepend_bos=False)
@example(subject="  spaced  out ", prepend_bos=True)
@example(subject="Zürich 東京 🙂", prepend_bos=False)
@example(subject="Fact", prepend_bos=True)
def test_groups_property(tiny_llama_dir, subject, prepend_bos):
    tokenizer = _cached_tokenizer(tiny_llama_dir)
    prompt = TEMPLATE.format(subject=subject)
    assume(prompt.find(subject) == prompt.rfind(subject))  # the inserted subject is the only occurrence
    item = encode(fact(subject, prompt), tokenizer, prepend_bos)
    check_groups(item, tokenizer, prepend_bos)
    # in the template only the space (when the tokenizer splits it off) stands between the label and the subject
    spans = offsets(tokenizer, prompt)
    between = range(len(label_positions(item, int(prepend_bos))), item.subject_positions[0] - prepend_bos)
    assert "".join(prompt[slice(*spans[i])] for i in between) in ("", " ")


_TOKENIZERS: dict = {}


def _cached_tokenizer(folder):
    from transformers import AutoTokenizer

    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder)
    return _TOKENIZERS[folder]


# ---------------------------------------------------------------------------------------------------------------
# Attribute tokens and relation targets


def test_attribute_token_is_what_follows_the_prompt(tokenizer):
    for item in encode_all(load_facts(), tokenizer, False):
        f = item.fact
        prompt_ids = tokenizer(f.prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(f.prompt + " " + f.attribute, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert item.attribute_token == full_ids[len(prompt_ids)]
        assert attribute_tokens(f, tokenizer) == full_ids[len(prompt_ids):]
        assert tokenizer.decode(attribute_tokens(f, tokenizer)) == " " + f.attribute
        assert item.attribute_n_tokens == len(full_ids) - len(prompt_ids)


@settings(max_examples=60, deadline=None)
@given(attribute=safe_text)
def test_attribute_tokens_property(tiny_llama_dir, attribute):
    tokenizer = _cached_tokenizer(tiny_llama_dir)
    f = fact("The Colosseum", COLOSSEUM["prompt"], attribute=attribute)
    ids = attribute_tokens(f, tokenizer)
    assert ids
    assert tokenizer.decode(ids) == " " + attribute
    prompt_ids = tokenizer(f.prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(f.prompt + " " + attribute, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        assert ids == full_ids[len(prompt_ids) :]
    else:  # the continuation merged across the prompt's end: ` attribute` is tokenized alone
        assert ids == tokenizer(" " + attribute, add_special_tokens=False)["input_ids"]


def test_multi_token_flag(tokenizer):
    assert len(tokenizer(" country", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(" Italy", add_special_tokens=False)["input_ids"]) > 1
    single = encode(fact("The Colosseum", COLOSSEUM["prompt"], attribute="country"), tokenizer, False)
    multi = encode(fact("The Colosseum", COLOSSEUM["prompt"], attribute="Italy"), tokenizer, False)
    assert (single.attribute_n_tokens, single.multi_token) == (1, False)
    assert multi.attribute_n_tokens == len(tokenizer(" Italy", add_special_tokens=False)["input_ids"])
    assert multi.multi_token is True


def test_relation_targets(tokenizer):
    first = lambda word: tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert first("Italy") == first("India") != first("France")  # " I..." shares its first token
    facts = [
        fact("The Colosseum", COLOSSEUM["prompt"], attribute="Italy", relation="country", prompt_id="a"),
        fact("The Taj Mahal", "Fact: The Taj Mahal is in the country of", attribute="India", relation="country", prompt_id="b"),
        fact("The Eiffel Tower", EIFFEL["prompt"], attribute="France", relation="country", prompt_id="c"),
        fact("The Louvre", "Fact: The Louvre is in the country of", attribute="France", relation="country", prompt_id="d"),
        fact("Rome", "Fact: Rome is in the country of", attribute="Italy", relation="city", prompt_id="e"),
    ]
    targets = relation_targets(encode_all(facts, tokenizer, False))
    assert targets == {
        "country": {first("Italy"): "Italy", first("France"): "France"},
        "city": {first("Italy"): "Italy"},
    }


def test_relation_targets_of_shipped_facts(tokenizer):
    encoded = encode_all(load_facts(), tokenizer, False)
    targets = relation_targets(encoded)
    assert set(targets) == {item.fact.relation for item in encoded}
    for relation, by_token in targets.items():
        items = [item for item in encoded if item.fact.relation == relation]
        assert set(by_token) == {item.attribute_token for item in items}
        for token, name in by_token.items():
            assert name == next(item.fact.attribute for item in items if item.attribute_token == token)


# ---------------------------------------------------------------------------------------------------------------
# Known bugs (see the report): splitlines() breaks rows at U+2028, NEL, "\r" ...; a UTF-8 BOM is not accepted;
# the non-UTF-8 message gives a byte offset, not the line.


def test_jsonl_string_with_line_separator(tmp_path):
    row = _bad(subject="A\u2028B", prompt="Fact: A\u2028B is in the country of")
    path = tmp_path / "ls.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(EIFFEL) + "\n", encoding="utf-8")
    facts = load_facts(path)
    assert [f.subject for f in facts] == ["A\u2028B", EIFFEL["subject"]]
    assert [f.line for f in facts] == [1, 2]


def test_csv_quoted_carriage_return(tmp_path):
    path = write_csv(tmp_path / "cr.csv", list(FIELDS),
                     [["r", "A\rB", "Fact: A\rB is in", "x"], list(EIFFEL.values())])
    facts = load_facts(path)
    assert facts[0].subject == "A\rB"


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.csv"])
def test_utf8_bom(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        text = ",".join(FIELDS) + "\n" + ",".join(COLOSSEUM.values()) + "\n"
    else:
        text = json.dumps(COLOSSEUM) + "\n"
    path.write_text(text, encoding="utf-8-sig")
    assert load_facts(path)[0].attribute == "Italy"


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(COLOSSEUM) + "\n").encode() + json.dumps(_bad(subject="Zürich"), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(FactscopeError, match=rf"^{path}:2:"):
        load_facts(path)
