"""factscope: how a language model recalls a fact, measured and causally checked.

Every command is a library call with the same options (see `stages`):

    import factscope
    run = factscope.analyze("smollm2-135m", out="runs/smollm2")   # → rundir.Run; shows its summary in Jupyter
    factscope.ablate(run.path, limit=24)
    factscope.load_run("runs/smollm2").heads
"""

import os

# factscope never downloads weights at run time: make the Hugging Face libraries fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

# name → module that defines it; imported on first use, so `import factscope` stays fast and torch-free.
# (`recall` is `factscope.stages.recall`: the name `factscope.recall` is the recall module.)
_EXPORTS = {
    "analyze": "stages", "ablate": "stages", "trace": "stages", "compare": "stages",
    "import_facts": "stages", "write_report": "stages", "load_run": "rundir", "Run": "rundir",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'factscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
