"""Post-hoc EMA (EDM2): rebuild the EMA of any width from a run's stored profile snapshots.

A run trained with `-o posthoc_ema_sigma_rel=0.05,0.1` stores every `ema_snapshot_every` steps
its power-function EMA profiles under <run>/ema_snapshots/. This command finds, for each width
asked for, the combination of those snapshots whose averaging kernel best matches the wanted one
(least squares over the kernels, docs/method.md §15) and writes it as an ordinary checkpoint
directory <out>/sigma_rel-<value>/ema.safetensors (+ posthoc_ema.json with the coefficients and
the fit's relative residual, + manifest.json), which `sample/grid.py --ckpt` and
`eval/fid.py gen --ckpt` load like any checkpoint. Every setting is a key of
sfd.config.PosthocEmaConfig.

Examples:
    # EDM2's two widths and a narrower one, as of the last snapshot
    python eval/posthoc_ema.py runs/sfd-xl --sigma-rel 0.05,0.1,0.03 --out runs/sfd-xl/posthoc
    # the EMA as it was at step 400000, then a grid from it
    python eval/posthoc_ema.py runs/sfd-xl --sigma-rel 0.08 --at-step 400000 --out runs/sfd-xl/posthoc-400k
    python sample/grid.py --ckpt runs/sfd-xl/posthoc-400k/sigma_rel-0.08 --out grid.png
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sfd.checkpoint import atomic_path, save_checkpoint
from sfd.cli import Arg, config_parser, parse_config, print_config, run_cli
from sfd.config import ConfigError, PosthocEmaConfig, model_config_from_json
from sfd.manifest import write_manifest
from sfd.posthoc_ema import parse_sigma_rels, reconstruct


def build_parser():
    return config_parser(
        PosthocEmaConfig, prog="eval/posthoc_ema.py", description=__doc__,
        args=(Arg("run"), Arg("--sigma-rel"), Arg("--out", required=True), Arg("--at-step")),
    )


def width_dir(out: str | Path, sigma_rel: float) -> Path:
    return Path(out) / f"sigma_rel-{sigma_rel:g}"


def main(argv: Sequence[str] | None = None) -> int | None:
    cfg, args = parse_config(build_parser(), argv)
    if args.dry_run:
        return print_config(cfg)
    run = Path(cfg.run)
    if not cfg.run or not run.is_dir():
        raise ConfigError(f"no run directory at '{cfg.run}'; pass the --out-dir of a train/main.py run")
    sigma_rels = parse_sigma_rels(cfg.sigma_rel)
    if not sigma_rels:
        raise ConfigError("--sigma-rel is empty; give the widths to rebuild, e.g. --sigma-rel 0.05,0.1")
    t0 = time.perf_counter()
    results = reconstruct(run, sigma_rels, cfg.at_step or None)
    for r in results:
        d = width_dir(cfg.out, r["sigma_rel"])
        d.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            d / "ema.safetensors", r["state_dict"], "lightningdit", model_config_from_json(r["model_config"]),
            r["run_config"], latent_stats=r["latent_stats"], step=r["step"],
        )
        info = {k: r[k] for k in ("sigma_rel", "gamma", "step", "residual", "coefficients")} | {"run": str(run)}
        with atomic_path(d / "posthoc_ema.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1) + "\n")
        write_manifest(d)  # last, as for a training checkpoint
        print(f"sigma_rel {r['sigma_rel']:g} (gamma {r['gamma']:.3f}) at step {r['step']}: {d}  "
              f"[{len(r['coefficients'])} profiles, relative L2 residual of the kernel fit {r['residual']:.2e}]")
    print(f"rebuilt {len(results)} width(s) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
