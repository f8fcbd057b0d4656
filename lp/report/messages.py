"""End-of-run and end-of-sweep messages: the headline numbers, warnings, where the files are."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def peak_memory(memory: dict | None) -> str:
    """`, peak RSS 1234 MB, GPU 5678 MB` over all stages of `result["memory"]` ('' when unknown)."""
    stages = list((memory or {}).values())
    rss = [m["rss_peak_mb"] for m in stages if isinstance(m.get("rss_peak_mb"), (int, float))]
    gpu = [v for m in stages for v in (m.get("cuda_peak_mb") or {}).values()]
    return (f", peak RSS {max(rss):.0f} MB" if rss else "") + (f", GPU {max(gpu):.0f} MB" if gpu else "")


def summary_line(result: dict, out: Path | None = None) -> str:
    """The end-of-run message: the headline numbers (QA average and RP first, then PPL, MMLU; the
    per-task scores stay in result.json), any warnings, and where the result and a saved model are."""
    p, m = result.get("pruning") or {}, result.get("metrics") or {}
    head = [f"qa/avg={100 * m['qa/avg']:.2f}" if isinstance(m.get("qa/avg"), float) else None,
            f"RP={m['qa/rp']:.2f}%" if isinstance(m.get("qa/rp"), float) else None,
            *(f"{k}={v:.3f}" for k, v in m.items() if k.startswith("ppl/") and isinstance(v, float)),
            f"mmlu={100 * m['mmlu/acc']:.2f}" if isinstance(m.get("mmlu/acc"), float) else None]
    head = [h for h in head if h]
    rest = sum(1 for k, v in m.items() if isinstance(v, float)) - len(head)
    lines = [f"[lp] {result['name']}: removed {p.get('removed_layers')} ({100 * p.get('pruned_ratio', 0):.2f}% "
             f"params)  {'  '.join(head)}{f'  (+{rest} more in result.json)' if rest > 0 else ''}  "
             f"in {result['timing']['total']:.1f}s{peak_memory(result.get('memory'))}"]
    lines += [f"[lp] WARNING: {w}" for w in result.get("warnings") or []]
    if out is not None:
        lines.append(f"[lp] result: {Path(out) / 'result.json'}")
    if result.get("saved_model"):
        lines.append(f"[lp] saved model: {result['saved_model']} (reload: lp.export.load_pruned)")
    return "\n".join(lines)


def sweep_message(name: str | None, records: list[dict], paths: dict) -> str:
    """The end-of-sweep message: counts, where the table and the dashboard are, each failure."""
    counts = Counter(r["status"] for r in records)
    resumed = sum(1 for r in records if r.get("resumed_from"))
    bad = [r for r in records if r["status"] != "ok"]
    lines = [f"sweep {name} done: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f" ({resumed} resumed)", f"  table:     {paths['table_md']}", f"  dashboard: {paths['dashboard']}"]
    lines += [f"  FAILED job {r['job_num']} ({r['status']}): {' '.join(r.get('overrides') or [])} -- "
              f"{str(r.get('error') or '').splitlines()[0][:300] if r.get('error') else 'no error recorded'}"
              for r in bad]
    return "\n".join(lines)
