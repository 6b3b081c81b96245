"""The names factscope's stages share: token groups, head classes, mechanisms. Torch-free, so the report,
the data layer and the maths all read them from here.

- token groups: every position of a prompt belongs to one (`data.encode` assigns them);
- head classes: what an attention head reads at END (`mechanisms.ClassRule` decides);
- mechanisms: a partition of every part of the residual stream at END, so their contributions add up exactly
  to the model's logit (and to a − mean(R∖a)).
"""

from __future__ import annotations

# `first`: position 0 when no BOS is prepended (the attention sink, whatever its text); `end`: the last token (END),
# which the paper counts in RELATION: a head's END←END part re-reads END's accumulated residual, not the relation's
# words, so it is its own group (the paper's RELATION is `relation` + `end`)
GROUPS = ("bos", "first", "prefix", "subject", "relation", "end")


def groups_present(prepend_bos: bool) -> tuple[str, ...]:
    """The groups a model's prompts can have: position 0 is either the BOS token or the first token."""
    return tuple(group for group in GROUPS if group != ("first" if prepend_bos else "bos"))

CLASSES = ("subject", "relation", "mixed", "negligible")
# the parts of the attribution table that carry a class's signal: a mixed head is read through both of its parts
CLASS_SOURCES = {"subject": ("subject",), "relation": ("relation",), "mixed": ("subject", "relation")}

# end_heads: every head's END←END part, whatever its class (the part the paper counts in RELATION); other_heads:
# negligible heads' parts, every head's BOS / first / prefix part, and a subject (relation) head's RELATION
# (SUBJECT) part; embed_bias: token and position embeddings, attention output biases, unembedding bias
MECHANISMS = (
    "subject_heads", "relation_heads", "mixed_subject", "mixed_relation", "end_heads", "mlps", "other_heads",
    "embed_bias",
)
# (class, source) → mechanism; every other attention part is `other_heads`
HEAD_MECHANISM = {
    ("subject", "subject"): "subject_heads",
    ("relation", "relation"): "relation_heads",
    ("mixed", "subject"): "mixed_subject",
    ("mixed", "relation"): "mixed_relation",
    **{(name, "end"): "end_heads" for name in CLASSES},
}
# reading order in tables and figures: subject-side mechanisms first, relation-side next, then the rest
MECHANISM_ORDER = (
    "subject_heads", "mixed_subject", "mixed_relation", "relation_heads", "end_heads", "mlps", "other_heads",
    "embed_bias",
)
assert set(MECHANISM_ORDER) == set(MECHANISMS)
# the mechanisms of the paper (END←END parts belong to its RELATION): verdicts on its claims are about these, not
# about the catch-all `other_heads` or the embeddings and biases
PAPER_MECHANISMS = tuple(name for name in MECHANISM_ORDER if name not in ("other_heads", "embed_bias"))

# the accepted |sum of parts − the model's logit| of the decomposition in fp32; also the floor below which a head's
# DLA never counts as significant (mechanisms.ClassRule)
TOLERANCE = 1e-3
# per dtype the model runs in: the parts (fp32 sums of bf16/fp16 activations) against the model's own final residual,
# which the model accumulated in its dtype, rounding at every layer (BENCHMARKS.md has the measured errors)
TOLERANCES = {"float32": TOLERANCE, "bfloat16": 0.5, "float16": 0.1}

DEFAULT_MODEL = "smollm2-135m"
