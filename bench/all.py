"""Re-run every CPU bench with quick settings and rewrite their table in docs/performance.md.

The table lives between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``; everything outside
the markers is left as it is. Each bench runs as its own process (one at a time: they time
themselves), its JSON is collected, and the section is rewritten with the date, the machine
(``nproc``, CPU model, memory) and the load average before and after each bench, so the figures
never drift from the code that produced them. A bench that fails is listed as failed with its
exit status, and the others still run. The raw JSON goes to ``--json`` (default
``runs/bench/all.json``); ``--from-json`` rewrites the section from such a file without
re-running anything.

Quick settings (minutes on 2 cores, not the full figures of the sections below the table):

- cache_reader: 8,192 rows (+ 1,280 with stored REPA targets), 5 interleaved rounds of 6 batches (3 with targets) after 2 warm-up;
- encode: 200 images at 64², 2 Ray actors, vs the 1- and 2-thread loops, plus the decode cost;
- train_step: LightningDiT-B/1, batch 8, eager only (``--no-compile``), 2 timed steps;
- budget: the analytic byte/FLOP model (B/1, XL/1, batch 32);
- memory: LightningDiT-XL/1, batch 32, traced under FakeTensorMode.

Example:
    python bench/all.py                      # what `just bench` runs
    python bench/all.py --only budget,memory --doc /tmp/perf.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (arguments, whether the JSON comes in a --json file rather than on the last stdout line)
BENCHES: dict[str, tuple[list[str], bool]] = {
    "cache_reader": (["--rows", "8192", "--dino-rows", "1280", "--rounds", "5", "--batches", "6"], False),
    "encode": (["--images", "200", "--image-size", "64", "--workers", "2", "--decode-sample", "50"], False),
    "train_step": (["--model", "LightningDiT-B/1", "--batch", "8", "--steps", "2", "--warmup", "1", "--no-compile", "--threads", "2"], False),
    "budget": (["--batch", "32"], True),
    "memory": (["--models", "LightningDiT-XL/1", "--batch", "32"], True),
}


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0.0
    if Path("/proc/meminfo").exists():
        first = Path("/proc/meminfo").read_text().split("\n", 1)[0]  # MemTotal: N kB
        mem = int(first.split()[1]) / 2**20
    import torch

    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__}


def run_bench(name: str, args: list[str], json_file: bool) -> dict[str, Any]:
    """Run one bench; its JSON result plus load averages, seconds and exit status."""
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    record: dict[str, Any] = {"command": " ".join(["python", f"bench/{name}.py", *args]), "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([*cmd, *(["--json", str(out)] if json_file else [])], capture_output=True, text=True, env=env, cwd=REPO)
        record.update(seconds=time.perf_counter() - t0, load_after=os.getloadavg(), returncode=proc.returncode)
        if proc.returncode != 0:
            record["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return record
        try:
            if json_file:
                record["result"] = json.loads(out.read_text())
            else:
                record["result"] = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
        except (StopIteration, ValueError, OSError) as e:
            record.update(returncode=-1, error=[f"no JSON result ({type(e).__name__})"])
    return record


# ---- figures per bench: name -> rows of (figure, value) ------------------------------------------------------


def _ratio(r: dict[str, Any]) -> str:
    return f"**{r['ratio_median']:.1f}×** (worst round {r['ratio_min']:.1f}×), {r['median']:,.0f} items/s"


def fig_cache_reader(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("none", "none"), ("stored", "stored")):
        for mode in ("memory", "pagecache"):
            k = f"{mode}_{key}_items_per_s"
            if k in r:
                rows.append((f"reader {mode}, REPA targets {label}: ours / authors' loader", _ratio(r[k])))
    for key, label in (("authors_none_items_per_s", "none"), ("authors_stored_items_per_s", "stored")):
        if key in r:
            rows.append((f"authors' loader, targets {label}", f"{r[key]['median']:,.0f} items/s"))
    return rows


def fig_encode(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (f"sequential loop, 1 thread ({r['images']} images at {r['image_size']}²)", f"{r['sequential_1thread_img_s']:.1f} img/s, {r['sequential_1thread_cpu_ms_per_img']:.0f} CPU ms/img"),
        ("sequential loop, 2 threads", f"{r.get('sequential_2thread_img_s', float('nan')):.1f} img/s"),
        ("Ray, 2 actors: steady state / whole stage", f"{r['ray_steady_img_s']:.1f} / {r['ray_overall_img_s']:.1f} img/s (start-up {r['ray_startup_s']:.0f} s)"),
        ("whole stage vs the 1-thread loop (goal ≥ 1.8×, idle machine)", f"**{r['speedup_overall_vs_seq1']:.2f}×** (steady {r['speedup_steady_vs_seq1']:.2f}×)"),
    ]
    if "decode_256_cpu_ms_per_img" in r:
        rows.append(("JPEG decode + 256² crop + flip, one thread", f"{r['decode_256_cpu_ms_per_img']:.1f} CPU ms/img"))
    return rows


def fig_train_step(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("fp32 matmul peak (measured)", f"{r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")]
    for name, v in r["variants"].items():
        rows.append((f"{r['model']} batch {r['batch']}, {name}", f"best step {v['step_s']:.2f} s, {v['fraction_of_peak']:.0%} of the matmul peak"))
    return rows


def fig_budget(r: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    for m in r:
        for dev, p in m["predictions"].items():
            rows.append((f"{m['model']} batch {m['batch']} on {dev} (analytic model, torch.compile)",
                         f"{p['compile']['img_per_s']:,.0f} img/s, MFU {p['compile']['mfu']:.0%}"))
    return rows


def fig_memory(r: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"{m['model']} batch {m['batch']}, checkpointing {'on' if m['grad_checkpointing'] else 'off'}",
             f"{m['total_gib']:.1f} GiB per GPU incl. EMA (activations at the peak {m['activations_at_peak_gib']:.1f})") for m in r]


FIGURES: dict[str, Callable[[Any], list[tuple[str, str]]]] = {
    "cache_reader": fig_cache_reader, "encode": fig_encode, "train_step": fig_train_step, "budget": fig_budget, "memory": fig_memory,
}


def section(data: dict[str, Any]) -> str:
    m = data["machine"]
    loads = [x for rec in data["benches"].values() for x in (rec["load_before"][0], rec["load_after"][0])]
    # The benches load the CPU themselves (Ray actors, two-thread loops), so the load after one
    # and before the next says little about other jobs; the load before the first bench does.
    first = next(iter(data["benches"].values()), None)
    contended = first is not None and first["load_before"][0] > 0.5 * (m["nproc"] or 1)
    lines = [
        BEGIN,
        "<!-- written by bench/all.py (`just bench`); edits between these markers are overwritten -->",
        f"Re-run {data['date']} by `just bench` (quick settings, see `bench/all.py`) on {m['nproc']} × {m['cpu']}, "
        f"{m['mem_gib']} GiB, Python {m['python']}, torch {m['torch']}. 1-min load average {min(loads, default=0):.1f}–{max(loads, default=0):.1f}"
        + (" — **contended**: timings are slowed by other jobs; ratios measured side by side hold better than absolute rates." if contended
           else " (quiet before the first bench; the rest of the range is the benches' own load)."),
        "",
        "| bench | figure | value | load before → after |",
        "|---|---|---|---|",
    ]
    for name, rec in data["benches"].items():
        load = f"{rec['load_before'][0]:.1f} → {rec['load_after'][0]:.1f}"
        rc = rec.get("returncode")
        if rc != 0:
            how = f"stopped by signal {-rc} after {rec['seconds']:.0f} s" if isinstance(rc, int) and rc < 0 and rc != -1 else f"exit {rc}"
            lines.append(f"| {name} | **not measured** ({how}) | {' '.join(rec.get('error', []))[:200]} | {load} |")
            continue
        try:
            rows = FIGURES[name](rec["result"])
        except (KeyError, TypeError, ValueError) as e:
            rows = [("(figures not found in its JSON)", f"{type(e).__name__}: {e}")]
        for i, (fig, val) in enumerate(rows):
            lines.append(f"| {name if i == 0 else ''} | {fig} | {val} | {load if i == 0 else ''} |")
    lines += ["", "Commands: " + "; ".join(f"`{rec['command']}`" for rec in data["benches"].values()), END]
    return "\n".join(lines)


def rewrite(doc: Path, text: str) -> None:
    old = doc.read_text()
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:  # first run: the section goes after the page's introduction (before the first "## ")
        at = old.find("\n## ")
        at = len(old) if at < 0 else at + 1
        new = old[:at] + "## Current figures (`just bench`)\n\n" + text + "\n\n" + old[at:]
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Example:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of benches (default all: {','.join(BENCHES)})")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md", help="the page whose section is rewritten")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "bench" / "all.json", help="where the raw results go")
    ap.add_argument("--from-json", type=Path, default=None, help="rewrite the section from this file; run nothing")
    ap.add_argument("--dry-run", action="store_true", help="print the section instead of rewriting the page")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
    else:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHES))
        if unknown:
            print(f"error: unknown bench(es) {unknown}; choose from {list(BENCHES)}", file=sys.stderr)
            return 2
        data = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "benches": {}}
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            rec = data["benches"][name] = run_bench(name, *BENCHES[name])
            status = "ok" if rec["returncode"] == 0 else f"FAILED (exit {rec['returncode']}): {' '.join(rec.get('error', []))}"
            print(f"[bench] {name}: {status} in {rec['seconds']:.0f} s, load {rec['load_before'][0]:.1f} -> {rec['load_after'][0]:.1f}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    text = section(data)
    if args.dry_run:
        print(text)
    else:
        rewrite(args.doc, text)
        print(f"rewrote the bench section of {args.doc}")
    return 0 if all(rec.get("returncode") == 0 for rec in data["benches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
