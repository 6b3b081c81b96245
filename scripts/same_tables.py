"""Are two factscope versions' tables byte-identical on the shipped dataset?

    python scripts/same_tables.py run OUT_DIR       # analyze + ablate --limit 24 + trace --limit 6 --seeds 0
    python scripts/same_tables.py compare DIR_A DIR_B

`run` drives the CLI in fresh subprocesses, as a user would; `compare` hashes every table (CSV, parquet, and
summary.json without its version-dependent keys) and exits 1 on the first difference. Used to show that a
behaviour-preserving change (the layout of issue 15) preserves behaviour.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

COMMANDS = (
    ["analyze", "--out", "{out}"],
    ["ablate", "{out}", "--limit", "24", "--threads", "2"],
    ["trace", "{out}", "--limit", "6", "--seeds", "0", "--threads", "2"],
)
SKIP = {"report.html", "run.json"}  # run.json records versions and paths; report.html embeds random div ids


def run(out: Path) -> None:
    for command in COMMANDS:
        args = [part.format(out=out) for part in command]
        subprocess.run([sys.executable, "-m", "factscope", *args], check=True)


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in SKIP or path.suffix == ".png":
            continue
        data = path.read_bytes()
        if path.name == "summary.json":
            summary = json.loads(data)
            summary.pop("dataset", None)
            data = json.dumps(summary, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def compare(a: Path, b: Path) -> int:
    left, right = digests(a), digests(b)
    different = sorted(name for name in left.keys() | right.keys() if left.get(name) != right.get(name))
    for name in different:
        print(f"differs: {name}")
    print(f"{len(left.keys() & right.keys()) - len(different)} of {len(left.keys() | right.keys())} files identical")
    return 1 if different else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
