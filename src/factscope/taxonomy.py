"""The names factscope's stages share: token groups, head classes, mechanisms. Torch-free, so the report,
the data layer and the maths all read them from here.

- token groups: every position of a prompt belongs to one (`data.encode` assigns them);
- head classes: what an attention head reads at END (`mechanisms.ClassRule` decides);
- mechanisms: a partition of every part of the residual stream at END, so their contributions add up exactly
  to the model's logit (and to a − mean(R∖a)).
"""

from __future__ import annotations

GROUPS = ("bos", "prefix", "subject", "relation")

CLASSES = ("subject", "relation", "mixed", "negligible")
# the parts of the attribution table that carry a class's signal: a mixed head is read through both of its parts
CLASS_SOURCES = {"subject": ("subject",), "relation": ("relation",), "mixed": ("subject", "relation")}

# other_heads: negligible heads, every head's BOS / prefix part, and a subject (relation) head's RELATION
# (SUBJECT) part; embed_bias: token and position embeddings, attention output biases, unembedding bias
MECHANISMS = (
    "subject_heads", "relation_heads", "mixed_subject", "mixed_relation", "mlps", "other_heads", "embed_bias",
)
# (class, source) → mechanism; every other attention part is `other_heads`
HEAD_MECHANISM = {
    ("subject", "subject"): "subject_heads",
    ("relation", "relation"): "relation_heads",
    ("mixed", "subject"): "mixed_subject",
    ("mixed", "relation"): "mixed_relation",
}
# reading order in tables and figures: subject-side mechanisms first, relation-side next, then the rest
MECHANISM_ORDER = ("subject_heads", "mixed_subject", "mixed_relation", "relation_heads", "mlps", "other_heads", "embed_bias")
assert set(MECHANISM_ORDER) == set(MECHANISMS)

# the accepted |sum of parts − the model's logit| of the decomposition in fp32; also the floor below which a head's
# DLA never counts as significant (mechanisms.ClassRule)
TOLERANCE = 1e-3
# per dtype the model runs in: the parts (fp32 sums of bf16/fp16 activations) against the model's own final residual,
# which the model accumulated in its dtype, rounding at every layer (BENCHMARKS.md has the measured errors)
TOLERANCES = {"float32": TOLERANCE, "bfloat16": 0.5, "float16": 0.1}

DEFAULT_MODEL = "smollm2-135m"
