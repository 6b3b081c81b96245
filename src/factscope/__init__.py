"""factscope: how a language model recalls a fact, measured and causally checked."""

import os

# factscope never downloads weights at run time: make the Hugging Face libraries fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """`factscope.load_run(DIR)` and `factscope.write_report(DIR)` without importing the report at start-up."""
    if name in ("load_run", "write_report"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module 'factscope' has no attribute {name!r}")
