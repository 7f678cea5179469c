"""The ``imem`` command line. Every subcommand turns an ImemError into one line and exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from imem.errors import ImemError


def run_stage(fn: Callable[[], object]) -> None:
    """Run a stage/subcommand body: a user error becomes ``error: <one line>`` on stderr and exit 1."""
    try:
        fn()
    except ImemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def _synth(args: argparse.Namespace) -> None:
    from imem.data.synth import synthesize
    from imem.params import section

    p = section("synth", path=args.params)
    out = Path(args.out or p["out"])
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ImemError(f"{out} exists and is not empty: pass --force to regenerate it")
    if args.labels_only and args.imemnet_scale:
        raise ImemError("--labels-only and --imemnet-scale exclude each other (--labels-only is already at IMEMNet scale)")
    summary = synthesize(p, out, labels_only=args.labels_only, progress=not args.quiet,
                         imemnet_scale=args.imemnet_scale)
    print(f"wrote the embedded corpus (generated, not real data) to {out}: {summary}")


def _prepare(args: argparse.Namespace) -> None:
    from imem.data.prepare import prepare, write_outputs
    from imem.params import section

    p = section("prepare", path=args.params)
    prep = prepare(p, progress=not args.quiet)
    write_outputs(prep, args.out, args.reports)
    print(f"sigma = {prep.stats['sigma']:.6f}; pairs: "
          + ", ".join(f"{s} {c['pairs']}" for s, c in prep.stats["counts"].items()))


def _audit(args: argparse.Namespace) -> None:
    from imem.data.pairs import audit_markdown, leakage_audit, read_pair_list
    from imem.io import write_json

    lists = {}
    for item in args.lists:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem.replace("_matching", ""), item
        lists[name] = read_pair_list(path)
    report = leakage_audit(lists)
    print(audit_markdown(report, "Leakage audit"))
    if args.json:
        write_json(args.json, report)


def _image_size(params: str) -> int:
    """The feature store's image size (features.image_size): prediction inputs are resized as in training."""
    from imem.params import section

    return int(section("features", path=params)["image_size"])


def _predict(args: argparse.Namespace) -> None:
    import pandas as pd

    from imem.inference import Predictor, load_model, predict
    from imem.io import write_csv

    loaded = load_model(args.model)
    predictor = Predictor(loaded, image_size=_image_size(args.params), hop=args.hop, progress=not args.quiet)
    df = predict(args.files, predictor)
    # printed: without the columns no row fills (an image-only input has no windows); the CSV keeps them all
    shown = df.loc[:, [c for c in df.columns if not (df[c].isna() | (df[c].astype(str) == "")).all()]]
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep=""))
    audio = (df["type"] == "audio").any()
    print(f"VA on the prepared labels' [0, 1] scale; model {loaded.name}"
          + (f"; audio: {predictor.clip_s:g}-s windows every {predictor.hop:g} s, 'mean' = the mean over a file's "
             "windows" if audio else ""))
    if args.out:
        write_csv(args.out, df)
        print(f"wrote {args.out}")


def _summary(args: argparse.Namespace) -> None:
    from imem.summary import compact

    print(compact(args.comparison, stats=args.stats))


def _retrieve(args: argparse.Namespace) -> None:
    import pandas as pd

    from imem.inference import load_model
    from imem.retrieval import retrieve, write_results

    if bool(args.audio) == bool(args.image) or (args.audio and not args.images) or (args.image and not args.music):
        raise ImemError("retrieve: give either --audio FILE --images DIR (music -> images) "
                        "or --image FILE --music DIR (image -> music)")
    loaded = load_model(args.model)
    query, side, coll = (args.audio, "music", args.images) if args.audio else (args.image, "image", args.music)
    df, summary = retrieve(loaded, query, side, coll, k=args.k, cache_dir=args.cache_dir, chunk_size=args.chunk_size,
                           hop=args.hop, rank_by=args.rank_by, image_size=_image_size(args.params),
                           progress=not args.quiet)
    files = write_results(df, summary, args.out)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 70):
        print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"query {summary['query']}: predicted valence {summary['query_valence']:.4f}, arousal "
          f"{summary['query_arousal']:.4f}; collection {summary['collection_size']} files "
          f"({summary['embedded']} embedded, {summary['cached']} from the cache {summary['cache_dir']})")
    print(f"wrote {files['csv']} and {files['html']}")


def _tune(args: argparse.Namespace) -> None:
    from imem.tuning import run_tune

    s = run_tune(args.params, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials,
                 prepare_dir=args.prepare, features_dir=args.features, out_dir=None if args.no_write else args.out,
                 track=not args.no_track, progress=not args.quiet)
    if s is None:  # a torchrun rank > 0: rank 0 reports
        return
    print(f"study {s['study']} ({s['storage']}): {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed")
    if s["best"] is not None:
        print(f"best trial {s['best']['number']}: value {s['best']['value']:.6g}, params {s['best']['params']}")
    if "best_params" in s:
        print(f"wrote {Path(args.out) / 'best_params.yaml'}; promote with:\n  {s['best_params']['promote']}")


def _repro_check(args: argparse.Namespace) -> None:
    from imem.reproducibility import check

    if not check(".", rev=args.rev, tolerance=args.tolerance):
        raise ImemError(f"the regenerated outputs break the reproducibility contract against {args.rev} "
                        "(lines above; README: Reproducibility)")
    print(f"reproducibility contract holds against {args.rev}")


def _repro_perturb(args: argparse.Namespace) -> None:
    import pandas as pd

    from imem.reproducibility import (
        TOLERANCE_FILE,
        check_metrics,
        load_rules,
        perturbed_run,
        summarize_deviation,
    )

    rules = load_rules(args.tolerance or TOLERANCE_FILE)
    diff = perturbed_run(".", args.work, args.setting, stages=args.stages)
    if args.json:
        from imem.io import write_json

        write_json(args.json, diff)
    table = pd.DataFrame(summarize_deviation(diff, rules))
    with pd.option_context("display.width", 250, "display.max_colwidth", 120):
        print(table.to_string(index=False))
    bad, n = check_metrics(diff, rules)
    print(f"{n} metrics checked, {len(bad)} outside the tolerance of {args.tolerance or TOLERANCE_FILE}")
    for f in bad:
        print("  " + f.line())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imem", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the embedded corpus (real corpora's formats, generated data)")
    s.add_argument("--params", default="params.yaml", help="params file (section 'synth')")
    s.add_argument("--out", help="output directory (default: synth.out)")
    s.add_argument("--labels-only", action="store_true",
                   help="IMEMNet-scale annotations only (1,802 songs / 35,817 clips, 25,620 images), no media")
    s.add_argument("--imemnet-scale", action="store_true",
                   help="the full corpus (audio, images) at IMEMNet's counts instead of the n_* params "
                        "(about 10 GB; the on-demand run of benchmarks/imemnet_scale.py)")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_synth)

    p = sub.add_parser("prepare", help="clips, images, pairs and the leakage audit (the DVC stage's work)")
    p.add_argument("--params", default="params.yaml", help="params file (section 'prepare')")
    p.add_argument("--out", default="artifacts/prepare")
    p.add_argument("--reports", default="reports/prepare")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_prepare)

    a = sub.add_parser("audit", help="leakage audit of pair lists: NAME=PATH ... (IMEMNet format)")
    a.add_argument("lists", nargs="+", help="e.g. val=val_matching.txt test=test_matching.txt")
    a.add_argument("--json", help="also write the report as JSON")
    a.set_defaults(fn=_audit)

    t = sub.add_parser("tune", help="Optuna study of lr, CFM margin, head strategy (params 'tune'); run it in "
                       "several shells against one --storage to share the trials")
    t.add_argument("--params", default="params.yaml", help="params file (sections 'tune' and 'train')")
    t.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, tune.storage, "
                   "sqlite:///optuna.db at the repo root; postgresql://... for workers on several machines)")
    t.add_argument("--study-name", help="default: tune.study_name or imem-<variant>-<digest> (the digest covers the "
                   "tune settings, the variant config and the data, so the same command resumes the same study)")
    t.add_argument("--n-trials", type=int, help="override tune.n_trials (COMPLETE + PRUNED trials of the study)")
    t.add_argument("--prepare", default="artifacts/prepare")
    t.add_argument("--features", default="artifacts/features")
    t.add_argument("--out", default="reports/tune", help="where best_params.yaml and trials.csv go")
    t.add_argument("--no-write", action="store_true", help="a worker that only runs trials (writes no report)")
    t.add_argument("--no-track", action="store_true", help="no MLflow runs")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_tune)

    pr = sub.add_parser("predict", help="valence-arousal of image and audio files (long audio: per 2-s window + mean)")
    pr.add_argument("files", nargs="+", help="image/audio files or directories of them")
    pr.add_argument("--model", default="models/cnn",
                    help="a training output dir (best.pt), a checkpoint file, or an MLflow URI runs:/<id>/model (a tuning "
                         "trial: runs:/<id>/checkpoints/best.pt), models:/<name>/<version>")
    pr.add_argument("--hop", type=float, help="seconds between audio windows (default: the clip length, 2 s)")
    pr.add_argument("--out", help="also write the table as CSV to this file")
    pr.add_argument("--params", default="params.yaml", help="params file (features.image_size)")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(fn=_predict)

    r = sub.add_parser("retrieve", help="music -> images (--audio, --images) or image -> music (--image, --music)")
    r.add_argument("--audio", help="query audio file (ranks the images under --images)")
    r.add_argument("--images", help="directory of images to search")
    r.add_argument("--image", help="query image file (ranks the audio files under --music)")
    r.add_argument("--music", help="directory of audio files to search")
    r.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    r.add_argument("--model", default="models/cnn", help="a matching model: training output dir or MLflow URI")
    r.add_argument("--out", default="retrieval", help="directory for results.csv, summary.json, index.html")
    r.add_argument("--cache-dir", help="embedding cache (default $IMEM_CACHE_DIR or ~/.cache/imem)")
    r.add_argument("--chunk-size", type=int, default=16384, help="collection rows scored per chunk (bounds memory)")
    r.add_argument("--hop", type=float, help="seconds between audio windows (default 2 s)")
    r.add_argument("--rank-by", choices=("sim", "distance"), default="distance",
                   help="squared embedding distance (default; the better top-5 on the embedded corpus) or "
                        "predicted similarity S")
    r.add_argument("--params", default="params.yaml", help="params file (features.image_size)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=_retrieve)

    sm = sub.add_parser("summary", help="the comparison's headline numbers in 100 columns (what `make repro` prints)")
    sm.add_argument("--comparison", default="reports/comparison/comparison.csv", help="the compare stage's CSV")
    sm.add_argument("--stats", default="reports/prepare/stats.json", help="the prepare stage's stats (corpus name)")
    sm.set_defaults(fn=_summary)

    rp = sub.add_parser("repro", help="the reproducibility contract: check regenerated outputs against git, or "
                        "measure how trained outputs move on another (simulated) CPU")
    rsub = rp.add_subparsers(dest="repro_command", required=True)
    rc = rsub.add_parser("check", help="after `make repro`: data stages byte-identical to REV, every metric within "
                         "the tolerance of reproducibility.yaml (what CI runs)")
    rc.add_argument("--rev", default="HEAD", help="the git revision holding the committed outputs (default HEAD)")
    rc.add_argument("--tolerance", help="tolerance file (default reproducibility.yaml)")
    rc.set_defaults(fn=_repro_check)
    rq = rsub.add_parser("perturb", help="re-run the trained stages of this checkout (its working tree) in a clone under another "
                         "instruction set / thread count and print how far every metric moved, per tolerance rule")
    from imem.reproducibility import PERTURBATIONS

    rq.add_argument("work", help="a new directory for the clone")
    rq.add_argument("--setting", choices=sorted(PERTURBATIONS), default="avx2-1thread")
    rq.add_argument("--tolerance", help="tolerance file (default reproducibility.yaml)")
    rq.add_argument("--json", help="also write the metrics diff as JSON")
    rq.add_argument("--stages", nargs="+", metavar="TARGET",
                    help="only these `dvc repro` targets (e.g. evaluate@cnn; default: the whole dvc.yaml)")
    rq.set_defaults(fn=_repro_perturb)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.fn(args))


if __name__ == "__main__":
    main()
