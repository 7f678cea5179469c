"""DVC stage `sp_net`: SP-Net from the unimodal variants' test predictions -> reports/methods/sp_net/."""

import argparse

from imem.cli import run_stage
from imem.methods.sp_net import run_sp_net
from imem.params import merge, section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    from imem.methods import sp_net

    p = section("methods")
    cfg = {**p["common"], **merge(sp_net.DEFAULTS, p.get("sp_net") or {}, "methods.sp_net")}
    m = run_sp_net(cfg, "reports/evaluate", "artifacts/prepare", "reports/prepare/stats.json", section("evaluate"),
                   "reports/methods/sp_net", track=not args.no_track)
    print(f"SP-Net: test sim MSE {m['rows']['SP-Net']['sim_mse']:.4f}; wrote reports/methods/sp_net/")


if __name__ == "__main__":
    run_stage(main)
