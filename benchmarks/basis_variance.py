"""The basis-variance table: PPL per n and rotation basis from the result.json files of a sweep folder.

Reads every `result.json` (status ok) under the given folders (e.g. all timestamps of
outputs/multirun/basis_variance, see sweeps/basis_variance.yaml), groups by n and basis
(none, diag, rotate:<patch.hadamard>), and reports per PPL metric mean +- sample std, min..max and the
number of bases/seeds. Writes <first folder>/basis_variance.md and prints it.
Usage: python benchmarks/basis_variance.py outputs/multirun/basis_variance [more folders]
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ["none", "diag", "constructed", "official", "random_hadamard", "random"]


def label(r: dict) -> str:
    p = r["patch"]
    return p["kind"] if p["kind"] != "rotate" else p["hadamard"]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({min(values):.2f}..{max(values):.2f}, k={len(values)})")


def main(folders: list[str]) -> str:
    groups: dict = defaultdict(list)
    seen = set()
    for folder in folders:
        for path in sorted(Path(folder).rglob("result.json")):
            r = json.loads(path.read_text())
            if r.get("status") != "ok" or "patch" not in r:
                continue
            key = (r["pruning"]["n"], label(r), r["patch"].get("hadamard_seed"))
            if key in seen:  # a resumed/re-run job counts once
                continue
            seen.add(key)
            groups[(key[0], key[1])].append(r["metrics"])
    metrics = sorted({k for ms in groups.values() for m in ms for k in m if k.startswith("ppl/")})
    dense = groups.pop((0, "none"), [])  # the sweep's dense job
    ns = sorted({n for n, _ in groups})
    labels = [lb for lb in ORDER if any((n, lb) in groups for n in ns)]
    lines = []
    for metric in metrics:
        lines += [f"### {metric}" + (f" (dense: {dense[0][metric]:.2f})" if dense else ""), "",
                  "| basis | " + " | ".join(f"n={n}" for n in ns) + " |",
                  "|---" * (len(ns) + 1) + "|"]
        for lb in labels:
            row = [cell([m[metric] for m in groups[(n, lb)]]) if (n, lb) in groups else "" for n in ns]
            lines.append(f"| {lb} | " + " | ".join(row) + " |")
        lines.append("")
    text = "\n".join(lines)
    (Path(folders[0]) / "basis_variance.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(sys.argv[1:]))
