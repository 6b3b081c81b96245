"""`factscope import-facts`: ROME's known_1000.json and CounterFact records become facts that load and encode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tokenizer

from factscope.cli import FactFormat
from factscope.data import IMPORT_FORMATS, encode_all, import_facts, load_facts
from factscope.errors import FactscopeError

# Records as the two files spell them (known_1000.json of Meng et al. 2022; counterfact.json of the same paper).
KNOWN_1000 = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is located in the continent of",
     "prediction": " Antarctica", "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"},
    {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "template": "{} is owned by",
     "prediction": " Apple", "prompt": "Beats Music is owned by", "relation_id": "P127"},
    {"known_id": 2, "subject": "Audible.com", "attribute": "Amazon", "template": "{} is owned by",
     "prediction": " Amazon", "prompt": "Audible.com is owned by", "relation_id": "P127"},
    {"known_id": 3, "subject": "Catalonia", "attribute": "Barcelona", "template": "The capital of {} is",
     "prediction": " Barcelona", "prompt": "The capital of Catalonia is", "relation_id": "P36"},
]
COUNTERFACT = [
    {"case_id": 0, "pararel_idx": 2796, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is"], "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 1, "pararel_idx": 1132, "requested_rewrite": {
        "prompt": "{} is a native speaker of", "relation_id": "P1412", "target_new": {"str": "French", "id": "Q150"},
        "target_true": {"str": " English", "id": "Q1860"}, "subject": "Edwin of Northumbria"}},
    {"case_id": 2, "pararel_idx": 14, "requested_rewrite": {
        "prompt": "{}, that was created in", "relation_id": "P495", "target_new": {"str": "Sweden", "id": "Q34"},
        "target_true": {"str": "Italy", "id": "Q38"}, "subject": "Toko Yasuda"}},
]


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factscope", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["prompt"] + " " + r["attribute"] for r in KNOWN_1000]
    texts += [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in COUNTERFACT]
    return build_tokenizer(texts + ["Fact: French English Italy"])


def test_known_1000_imports_loads_and_encodes(tmp_path, tokenizer):
    source, out = write_json(tmp_path / "known_1000.json", KNOWN_1000), tmp_path / "facts.jsonl"
    result = cli("import-facts", source, "--format", "known_1000", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "imported 4 facts over 3 relations" in result.stderr
    facts = load_facts(out)
    assert [(f.prompt_id, f.relation, f.subject, f.prompt, f.attribute) for f in facts] == [
        (str(r["known_id"]), r["relation_id"], r["subject"], r["prompt"], r["attribute"]) for r in KNOWN_1000
    ]
    for item in encode_all(facts, tokenizer, prepend_bos=True):
        subject = "".join(token for token, group in zip(item.tokens, item.groups) if group == "subject")
        assert subject.strip() == item.fact.subject
        assert item.groups[0] == "bos" and "prefix" not in item.groups
        # the model's answer " Antarctica" (known_1000's prediction) is what factscope scores
        assert tokenizer.decode([item.attribute_token]).startswith(" ")


def test_counterfact_fills_the_template_with_the_subject_and_takes_the_true_target(tmp_path, tokenizer):
    rows = import_facts(write_json(tmp_path / "counterfact.json", COUNTERFACT), "counterfact")
    assert rows == [
        {"id": "0", "relation": "P103", "subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is",
         "attribute": "French"},
        {"id": "1", "relation": "P1412", "subject": "Edwin of Northumbria",
         "prompt": "Edwin of Northumbria is a native speaker of", "attribute": "English"},  # its leading space dropped
        {"id": "2", "relation": "P495", "subject": "Toko Yasuda", "prompt": "Toko Yasuda, that was created in",
         "attribute": "Italy"},
    ]


def test_prefix_and_limit(tmp_path, tokenizer):
    source, out = write_json(tmp_path / "counterfact.json", COUNTERFACT), tmp_path / "facts.jsonl"
    result = cli("import-facts", source, "-f", "counterfact", "-o", out, "--prefix", "Fact:", "--limit", "2")
    assert result.returncode == 0, result.stderr
    facts = load_facts(out)
    assert [f.prompt for f in facts] == ["Fact: The mother tongue of Danielle Darrieux is",
                                         "Fact: Edwin of Northumbria is a native speaker of"]
    item = encode_all(facts, tokenizer, prepend_bos=False)[1]
    assert [g for g, t in zip(item.groups, item.tokens) if t.strip() in ("Fact", ":")] == ["first", "prefix"]
    # "Fact: " (the shipped prompts' spelling) gives the same prompt as "Fact:"
    assert import_facts(source, "counterfact", prefix="Fact: ", limit=2) == [
        {"id": f.prompt_id, "relation": f.relation, "subject": f.subject, "prompt": f.prompt, "attribute": f.attribute}
        for f in facts
    ]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    source, out = write_json(tmp_path / "known_1000.json", KNOWN_1000), tmp_path / "facts.jsonl"
    out.write_text("mine\n")
    result = cli("import-facts", source, "--format", "known_1000", "--out", out)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert out.read_text() == "mine\n"
    result = cli("import-facts", source, "--format", "known_1000", "--out", out, "--overwrite")
    assert result.returncode == 2 and "not a file factscope wrote" in result.stderr  # the user's own file
    assert out.read_text() == "mine\n"
    out.unlink()
    assert cli("import-facts", source, "--format", "known_1000", "--out", out, "--limit", "2").returncode == 0
    assert cli("import-facts", source, "--format", "known_1000", "--out", out, "--overwrite").returncode == 0
    assert len(load_facts(out)) == len(KNOWN_1000)


def test_a_bad_record_fails_in_one_line_and_writes_nothing(tmp_path):
    records = [*KNOWN_1000[:2], {**KNOWN_1000[2], "prompt": "Audible is owned by"}]
    source, out = write_json(tmp_path / "known_1000.json", records), tmp_path / "facts.jsonl"
    result = cli("import-facts", source, "--format", "known_1000", "--out", out)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"factscope: error: {source}: record 2: field 'prompt' ('Audible is owned by') does not contain the subject "
        "'Audible.com'"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_an_unknown_format_is_a_usage_error(tmp_path):
    result = cli("import-facts", write_json(tmp_path / "x.json", KNOWN_1000), "--format", "pararel")
    assert result.returncode == 2 and "--format" in result.stderr


def test_the_cli_offers_every_import_format():
    assert [f.value for f in FactFormat] == list(IMPORT_FORMATS)


def rewrite(**changes) -> dict:
    record = json.loads(json.dumps(COUNTERFACT[0]))
    record["requested_rewrite"].update(changes)
    return record


@pytest.mark.parametrize(
    "format, records, message",
    [
        ("known_1000", {"known_id": 0}, "expected a JSON list of records, got dict"),
        ("known_1000", [], "the list has no records"),
        ("known_1000", [KNOWN_1000[0], ["Vinson Massif"]], "record 1: expected a JSON object, got list"),
        ("known_1000", [{k: v for k, v in KNOWN_1000[0].items() if k != "relation_id"}],
         "record 0: field 'relation_id' is missing"),
        ("known_1000", [{**KNOWN_1000[0], "attribute": 7}], "record 0: field 'attribute' must be a string, got int"),
        ("known_1000", [{**KNOWN_1000[0], "attribute": " "}], "record 0: field 'attribute' is empty"),
        ("known_1000", [{**KNOWN_1000[0], "known_id": None}], "record 0: field 'known_id' must be an integer or a"),
        ("known_1000", [{**KNOWN_1000[0], "prompt": "The continent of Vinson Massif"}],
         "record 0: field 'prompt' ('The continent of Vinson Massif') ends with the subject"),
        ("known_1000", [KNOWN_1000[0], KNOWN_1000[1], {**KNOWN_1000[2], "known_id": 1}],
         "record 2: field 'known_id' ('1') repeats the id of record 1"),
        ("counterfact", [rewrite(prompt="The mother tongue of Danielle Darrieux is")],
         "record 0: field 'requested_rewrite.prompt' ('The mother tongue of Danielle Darrieux is') has no '{}'"),
        ("counterfact", [{"case_id": 0, "requested_rewrite": "The mother tongue of {} is"}],
         "record 0: field 'requested_rewrite.subject' is missing"),
        ("counterfact", [rewrite(target_true={"id": "Q150"})], "record 0: field 'requested_rewrite.target_true.str' is missing"),
        ("counterfact", [KNOWN_1000[0]], "record 0: field 'case_id' is missing"),
    ],
)
def test_bad_input_names_the_file_the_record_and_the_field(tmp_path, format, records, message):
    source = write_json(tmp_path / "source.json", records)
    with pytest.raises(FactscopeError) as error:
        import_facts(source, format)
    assert str(error.value).startswith(f"{source}: ") and message in str(error.value)


def test_unreadable_sources(tmp_path):
    with pytest.raises(FactscopeError, match="file not found"):
        import_facts(tmp_path / "absent.json", "known_1000")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"known_id": 0,\n "subject": }]')
    with pytest.raises(FactscopeError, match=r"broken.json:2: malformed JSON"):
        import_facts(broken, "known_1000")
    with pytest.raises(FactscopeError, match="unknown import format 'pararel'"):
        import_facts(broken, "pararel")
