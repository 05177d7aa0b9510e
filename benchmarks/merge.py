"""Merge results measured side by side in separate folders (benchmarks/gpu_run.sh: one worker per group of rows,
each with CUSPRUN_BENCH_RESULTS pointing at its own folder) into results/quality.json and results/defaults.json.

A quality row already in results/ is kept as it is (the workers start from a copy of it); rows the workers added
are appended. Defaults rows from the workers replace results/defaults.json when any worker measured defaults.
Every row says the device it was measured on; each file keeps the machine of every run that wrote rows to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _machines(payload: dict) -> list[dict]:
    return payload.get("machines") or ([payload["machine"]] if payload.get("machine") else [])


def _add_machine(machines: list[dict], m: dict | None) -> None:
    """One entry per machine (runs side by side on one machine differ only in their start time: the last kept)."""
    if not m:
        return
    for i, old in enumerate(machines):
        if {k: v for k, v in old.items() if k != "date"} == {k: v for k, v in m.items() if k != "date"}:
            machines[i] = max(old, m, key=lambda x: x.get("date", ""))
            return
    machines.append(m)


def merge_quality(folders: list[Path]) -> int:
    from .quality import expected_rows

    path = RESULTS / "quality.json"
    main = _load(path)
    keys = {(r["setting"], r["method"], r["target_ratio"]) for r in main.get("rows", [])}
    machines, added = _machines(main), 0
    for folder in folders:
        part = _load(folder / "quality.json")
        if part.get("model") != main.get("model"):
            continue
        new = [r for r in part.get("rows", []) if (r["setting"], r["method"], r["target_ratio"]) not in keys]
        if new:
            _add_machine(machines, part.get("machine"))
        for r in new:
            keys.add((r["setting"], r["method"], r["target_ratio"]))
            main["rows"].append(r)
        added += len(new)
    missing = expected_rows() - keys
    main |= {"machines": machines, "partial": bool(missing),
             "note": f"{len(main['rows'])} rows, {len(missing)} to measure" if missing else ""}
    path.write_text(json.dumps(main, indent=2))
    return added


def merge_defaults(folders: list[Path]) -> int:
    parts = [_load(f / "defaults.json") for f in folders]
    parts = [p for p in parts if p.get("rows")]
    if not parts:
        return 0
    rows, seen, machines = [], set(), []
    for p in parts:
        for r in p["rows"]:
            if (r["setting"], r["ratio"], r["candidate"]) not in seen:
                seen.add((r["setting"], r["ratio"], r["candidate"]))
                rows.append(r)
        _add_machine(machines, p.get("machine"))
    out = {k: v for k, v in parts[0].items() if k not in ("rows", "partial", "machine")}
    out |= {"machine": machines[0], "machines": machines, "rows": rows}
    (RESULTS / "defaults.json").write_text(json.dumps(out, indent=2))
    return len(rows)


def main(argv: list[str]) -> None:
    folders = [Path(a) for a in argv]
    q, d = merge_quality(folders), merge_defaults(folders)
    print(f"[merge] {q} quality rows added; defaults: {d} rows")
