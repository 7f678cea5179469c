"""The on-demand IMEMNet-scale run (issue 14 item 4): the embedded corpus at IMEMNet's counts, then
prepare -> features -> train (fc_only) -> evaluate for each variant, and the comparison, each stage timed.

    make imemnet-scale        # = python benchmarks/imemnet_scale.py --work /tmp/imem-imemnet

IMEMNet's counts (CDCML table 1; ../shared/reference/facts.md): 1,744 45-s songs and 58 long ones giving
35,817 clips; 1,182 IAPS + 1,356 NAPS + 23,082 EMOTIC = 25,620 images; about 144K pairs. The run happens in
its own work directory (outside the repository: the corpus alone is about 10 GB), with the repository's
``params.yaml`` and these overrides, each for a reason:

- ``prepare.split`` 80/5/15 by song and by image: IMEMNet's own split (1,442 / 90 / 270 songs), not the
  default pipeline's 60/10/30 (which is sized for statistical power on a small corpus);
- ``prepare.pairs.keep_fraction`` 0.08: 50 candidates x 0.08 = 4 pairs per clip, 143K pairs in all, IMEMNet's
  "about 144K" (the default 0.1 would give 179K);
- ``train.common.n_seeds`` 1: one seed per variant keeps the run within its time goal; the rows carry the
  bootstrap interval over test songs and images, not a seed std;
- ``IMEM_BACKBONE_CACHE=<work>/.backbones``: the on-disk memo of frozen-backbone outputs, in the work
  directory (so a run never reads a memo of an earlier one). The train stage writes the outputs for every
  split's rows and evaluate reads that very entry instead of running ResNet50 / ViT / BEATs over the test split
  again (4.8 min for cnn in the first run, when the memo was off). Since the cache keeps only what a head reads
  (a pooled 2,048-d vector per image for cnn, one token per item for transformer_v2), it holds about 0.3 GB.

Each stage runs as its own child process (the repository's ``stages/*.py`` with the work directory as the
current directory), so its peak RSS is its own (``getrusage`` of the child, threads included). Disk is the
size of the stage's outputs after it ran (``du``-like, apparent bytes of regular files). The figures go to
``<report>/benchmark.{json,md}`` beside the comparison, and the command line that produced them; the work
directory can be deleted afterwards (``--clean``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from imem.io import atomic_path

REPO = Path(__file__).resolve().parents[1]
TITLE = "Comparison at IMEMNet scale (embedded corpus at IMEMNet's counts: generated data, not a paper's table)"
REHEARSAL = "Rehearsal of the IMEMNet-scale run at the params.yaml corpus size (embedded corpus: generated data)"
OVERRIDES = {
    "prepare": {"split": {"train": 0.8, "val": 0.05, "test": 0.15}, "pairs": {"keep_fraction": 0.08}},
    "train": {"common": {"n_seeds": 1}},
}
# A child that runs one stage script and writes its own peak RSS (KiB on Linux) and CPU seconds.
RUNNER = """
import json, resource, runpy, sys
out, kind, script, *args = sys.argv[1:]
sys.argv = [script, *args]
code = 0
try:
    if kind == "module":
        runpy.run_module(script, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"peak_rss_kib": max(me.ru_maxrss, kids.ru_maxrss), "cpu_s": me.ru_utime + me.ru_stime}, f)
sys.exit(code)
"""


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def tree_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return total


def run_stage(name: str, argv: list[str], work: Path, env: dict, outputs: list[str], log) -> dict:
    """One stage: ``argv`` is ``[script, *args]`` (a stage script) or ``["-m", module, *args]``."""
    stat = work / ".stage_stats.json"
    stat.unlink(missing_ok=True)
    kind, argv = ("module", argv[1:]) if argv[0] == "-m" else ("path", argv)
    cmd = [sys.executable, "-c", RUNNER, str(stat), kind, *argv]
    print(f"[imemnet-scale] {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"error: stage {name} failed (exit {rc}); its output is in {log.name}")
    s = json.loads(stat.read_text())
    row = {"stage": name, "wall_s": round(wall, 1), "cpu_s": round(s["cpu_s"], 1),
           "peak_rss_gb": round(s["peak_rss_kib"] / 2**20, 2),
           "disk_gb": round(tree_bytes([work / o for o in outputs]) / 1e9, 2), "outputs": outputs}
    print(f"[imemnet-scale] {name}: {row['wall_s']:.0f} s, peak RSS {row['peak_rss_gb']} GB, "
          f"outputs {row['disk_gb']} GB", flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# {meta['title']}: cost per stage", "",
             f"Command: `{meta['command']}` ({meta['date']}; {meta['machine']}). Work directory: `{meta['work']}`.",
             "Peak RSS: the stage's own process (threads included) and its children; disk: the stage's outputs.",
             "", "| stage | wall time | CPU time | peak RSS | outputs on disk |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min | {r['peak_rss_gb']:.2f} GB "
                     f"| {r['disk_gb']:.2f} GB |")
    total = sum(r["wall_s"] for r in rows)
    lines += [f"| **all** | **{total / 60:.1f} min** | | **{max(r['peak_rss_gb'] for r in rows):.2f} GB** (max) "
              f"| **{sum(r['disk_gb'] for r in rows):.2f} GB** |", "",
              "Goals (issue 14): all of it <= 2 h, peak RSS <= 12 GB. Counts per split: "
              + "; ".join(f"{split} {c['songs']:,} songs, {c['clips']:,} clips, {c['images']:,} images, {c['pairs']:,} pairs"
                          for split, c in meta["counts"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/imem-imemnet", help="work directory (about 25 GB; created)")
    ap.add_argument("--variants", nargs="+", default=["cnn", "transformer_v2"])
    ap.add_argument("--report", default=str(REPO / "reports" / "imemnet_scale"), help="where the comparison and figures go")
    ap.add_argument("--corpus", choices=["imemnet", "params"], default="imemnet",
                    help="imemnet: IMEMNet's counts (the run); params: the params.yaml sizes (a quick rehearsal)")
    ap.add_argument("--force", action="store_true", help="replace an existing work directory")
    ap.add_argument("--clean", action="store_true", help="delete the work directory after the run")
    ap.add_argument("--resume", action="store_true",
                    help="keep the work directory and skip the stages a previous run finished (their figures are kept)")
    args = ap.parse_args()

    work, report = Path(args.work).resolve(), Path(args.report).resolve()
    done_file = work / "stages_done.json"
    done = json.loads(done_file.read_text()) if args.resume and done_file.is_file() else []
    if args.resume and not done:
        raise SystemExit(f"error: --resume: {done_file} holds no finished stage; run without --resume")
    if not args.resume and work.exists() and any(work.iterdir()):
        if not args.force:
            raise SystemExit(f"error: {work} exists and is not empty: pass --force to replace it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 1e9
    if args.corpus == "imemnet" and free < 25 and not args.resume:
        raise SystemExit(f"error: {work} has {free:.0f} GB free; the IMEMNet-scale run needs about 25 GB")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), OVERRIDES)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "IMEM_BACKBONE_CACHE": str(work / ".backbones"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "TQDM_MININTERVAL": "30"}
    st = str(REPO / "stages")
    synth = ["-m", "imem.cli", "synth", "--out", "data", "--force"] + (["--imemnet-scale"] if args.corpus == "imemnet" else [])
    plan = [("synth", synth, ["data"]),
            ("prepare", [f"{st}/prepare.py"], ["artifacts/prepare", "reports/prepare"]),
            ("features", [f"{st}/features.py"], ["artifacts/features"])]
    for v in args.variants:
        plan += [(f"train {v}", [f"{st}/train.py", v], [f"models/{v}", f"reports/train/{v}"]),
                 (f"evaluate {v}", [f"{st}/evaluate.py", v], [f"reports/evaluate/{v}"])]
    title = TITLE if args.corpus == "imemnet" else REHEARSAL
    plan.append(("compare", [f"{st}/compare.py", "--out", str(report), "--title", title, "--variants", *args.variants],
                 []))
    rows = [r for r in done if r["stage"] in {name for name, _, _ in plan}]
    with open(work / "run.log", "a" if args.resume else "w") as log:
        for name, argv, outs in plan:
            if any(r["stage"] == name for r in rows):
                print(f"[imemnet-scale] {name}: finished by the previous run, skipped (--resume)", flush=True)
                continue
            rows.append(run_stage(name, argv, work, env, outs, log))
            with atomic_path(done_file) as tmp:  # after each stage: what --resume skips
                tmp.write_text(json.dumps(rows, indent=2))
    stats = json.loads((work / "reports" / "prepare" / "stats.json").read_text())
    meta = {"title": title, "command": "python benchmarks/imemnet_scale.py " + " ".join(sys.argv[1:]), "work": str(work),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}", "corpus": args.corpus,
            "counts": stats["counts"],
            "overrides": OVERRIDES}
    report.mkdir(parents=True, exist_ok=True)
    (report / "benchmark.json").write_text(json.dumps({"meta": meta, "stages": rows}, indent=2) + "\n")
    (report / "benchmark.md").write_text(markdown(rows, meta))
    for v in args.variants:  # the per-variant tables beside the comparison
        for f in ("regression.md", "retrieval.md", "metrics.json"):
            src = work / "reports" / "evaluate" / v / f
            if src.is_file():
                (report / v).mkdir(exist_ok=True)
                shutil.copy2(src, report / v / f)
    print((report / "benchmark.md").read_text())
    if args.clean:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
