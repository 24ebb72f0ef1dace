"""Measurement-validity and performance suite: prints one table, saves it as JSON in bench/results/.

    python bench/suite.py [--model GGUF] [--rounds 40] [--skip ops,depth,twin]

Every figure is a ratio or share measured within one run, with its 95 % bootstrap interval over rounds:
- capture overhead: profiled / plain decode ms/token per context, for stages and ops modes
  (every round decodes each depth plain and profiled, pass order alternating);
- attribution: share of profiled wall time covered by ops, and by stages with host included;
- mode agreement: |stage share in ops mode - in stages mode|, in percentage points (max over stages), paired by
  round: the stages sweep's calibration tokens time every node (an ops-mode token at a rotating depth), compared
  with the stages token of the same round and depth, both calibrated (``stats.mode_diff``); and, unpaired, the
  ops sweep's shares against the stages sweep's (two sweeps a minute apart: the device's state between them is
  in that figure, bench/NOTES.md §22);
- depth consistency: attn_kv ms/token rise from depth 13 to 4096 vs the plain wall-time rise (both
  resident, measured round-robin);
- roofline: plain ms/token / (read-model bytes per token / measured bandwidth), and achieved GB/s per stage;
- sweep cost: wall time of the default 3-context sweep and prefill tokens spent;
- twin generation: time and peak RSS of the E4B Q4_K_M twin.
Nothing here is asserted: targets are compared in the printed table and in bench/NOTES.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import run_sweep, save_results  # noqa: E402
from twin_bench import measure as twin_measure  # noqa: E402

from analysis import roofline  # noqa: E402
from analysis.readmodel import from_run  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.stages import STAGES  # noqa: E402
from harness.stats import mode_diff, round_data, split_cost_ms  # noqa: E402
from harness.store import read_run  # noqa: E402

SKIPPABLE = ("ops", "depth", "twin")
TARGETS = {"stages_overhead": 1.03, "ops_overhead": 1.10, "attributed_pct": 99.5, "mode_agreement_paired_pp": 2.0,
           "depth_consistency_pct": 10.0}


def sweep(a, out: Path, tag: str, *extra: str):
    t0 = time.perf_counter()
    run_sweep(["-r", str(a.rounds), "--out", str(out), "--label", f"bench-{tag}", *extra,
               *(["--model", a.model] if a.model else [])], f"the {tag} sweep")
    wall = time.perf_counter() - t0
    print(f"[{tag}] sweep took {wall:.1f} s", flush=True)
    return read_run(max(out.glob(f"*bench-{tag}_*.parquet"))), wall


def overhead_rows(run) -> list[dict]:
    rows = []
    for c in run.record.sorted_contexts():
        lo, hi = c.overhead_ratio_ci
        rows.append({"context": c.context, "depth": c.depth, "plain_ms": c.plain_ms, "overhead": c.overhead_ratio,
                     "overhead_ci95": (hi - lo) / 2, "syncs": c.syncs_per_token, "covered_pct": c.covered_pct,
                     "attributed_pct": c.attributed_pct, "stage_pct": c.stage_pct,  # shares calibrated where they are:
                     "stage_pct_cal": {s: c.share(s) for s in STAGES}, "sync_us": c.sync_us,  # ops mode has none
                     "noop_sync_us": c.noop_sync_us, "calibrated_sum_pct": c.calibrated_sum_pct,
                     "ops_rounds": c.ops_rounds, "mode_diff_pp": c.mode_diff_pp, "mode_diff_pp_ci": c.mode_diff_pp_ci,
                     "mode_worst": c.mode_worst()})
    return rows


def roofline_rows(run) -> list[dict]:
    bw = run.record.bandwidth_gbps
    model = from_run(run.record)  # the variant of the run's resolved flash attention
    rows = []
    for c in run.record.sorted_contexts():
        b, source = roofline.context_bytes(c, model)  # the graph's bytes when the run stored them
        total = sum(b.values())
        gbps = {s: roofline.gbps(b.get(s, 0), c.stage(s)) for s in ("ffn", "attn_kv", "lm_head", "attn_proj",
                                                                     "gemma3n_extra") if c.stage(s) > 0}
        rows.append({"context": c.context, "depth": c.depth, "bytes_per_token": total, "bytes_source": source,
                     "bandwidth_gbps": bw, "roofline_ms": roofline.roofline_ms(total, bw),
                     "measured_over_roofline": roofline.x_roofline(c.plain_ms, total, bw), "stage_gbps": gbps})
    return rows


def twin_generation() -> dict:
    """bench/twin_bench.py's measurement of the default twin (time, peak RSS, size, a llama.cpp load check)."""
    with tempfile.TemporaryDirectory(dir=ROOT / "models") as d:
        return twin_measure("gemma-3n-e4b", "q4_k_m", Path(d) / "twin.gguf")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="suite.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--skip", default="", help=f"comma list of: {', '.join(SKIPPABLE)}")
    a = ap.parse_args(argv)
    skip = set(filter(None, (x.strip() for x in a.skip.split(","))))
    if skip - set(SKIPPABLE):
        raise UsageError(f"--skip: unknown part(s) {', '.join(sorted(skip - set(SKIPPABLE)))} "
                         f"(choose from: {', '.join(SKIPPABLE)})")
    if a.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {a.rounds}")
    res: dict = {"model": a.model or "models/gemma-3n-e4b-q4.gguf", "targets": TARGETS}
    with tempfile.TemporaryDirectory() as d:
        stages, wall = sweep(a, Path(d), "stages")
        rec = stages.record
        res["device"] = rec.device.to_dict()
        res["callback"] = rec.params.callback
        res["sweep_cost"] = {"wall_s": wall, "sweep_s": rec.timing.sweep_s, "load_s": rec.timing.load_s,
                             "prefill_tokens": rec.timing.prefill_tokens}
        res["stages"] = overhead_rows(stages)
        res["roofline"] = roofline_rows(stages)
        res["mode_agreement_paired_pp"] = [c.mode_agreement_pp for c in rec.sorted_contexts()]  # both calibrated
        rd = round_data(stages.ops, stages.tokens, stages.calibration_stages)
        cost = split_cost_ms(rd.calib_delta, rd.calib_extra)
        raw = [mode_diff(rd, cost, d, ops_calibrated=False).get("mode_diff_pp", {}) for d in range(len(rd.labels))]
        res["mode_agreement_paired_ops_raw_pp"] = [max(map(abs, v.values())) if v else None for v in raw]
        if "ops" not in skip:
            ops, _ = sweep(a, Path(d), "ops", "--mode", "ops", "--no-probe")
            res["ops"] = overhead_rows(ops)
            for key, field in (("mode_agreement_unpaired_raw_pp", "stage_pct"),
                               ("mode_agreement_unpaired_pp", "stage_pct_cal")):
                res[key] = [max(abs(o[field][s] - g[field][s]) for s in STAGES)
                            for o, g in zip(res["ops"], res["stages"], strict=True)]
        if "depth" not in skip:
            deep, _ = sweep(a, Path(d), "depth", "-c", "13,4096", "--no-probe")
            c13, c4k = deep.record.sorted_contexts()
            kv_rise = c4k.stage("attn_kv") - c13.stage("attn_kv")
            wall_rise = c4k.plain_ms - c13.plain_ms
            res["depth"] = {"attn_kv_rise_ms": kv_rise, "plain_rise_ms": wall_rise,
                            "profiled_rise_ms": c4k.profiled_ms - c13.profiled_ms,
                            "disagreement_pct": 100 * (kv_rise - wall_rise) / wall_rise if wall_rise else None,
                            "stage_rise_ms": {s: c4k.stage(s) - c13.stage(s) for s in STAGES}}
    if "twin" not in skip:
        try:
            res["twin"] = twin_generation()
        except InputError as e:  # the sweeps' figures still get printed and saved
            res["twin"] = {"error": str(e)}
    report(res)
    print()
    save_results("suite", res)
    return 0


def report(res: dict) -> None:
    p = print
    bw = res["roofline"][0]["bandwidth_gbps"] or float("nan")
    p(f"\ncallback: {res['callback']}; bandwidth probe: {bw:.1f} GB/s")
    p(f"{'mode':7} {'context':8} {'depth':>5} {'plain ms':>9} {'overhead (95% CI)':>19} {'syncs':>6} "
      f"{'ops %':>7} {'attrib %':>8}")
    for mode in ("stages", "ops"):
        for r in res.get(mode, []):
            p(f"{mode:7} {r['context']:8} {r['depth']:5d} {r['plain_ms']:9.2f} x{r['overhead']:.3f} ± "
              f"{r['overhead_ci95']:.3f}     {r['syncs']:6d} {r['covered_pct']:7.2f} {r['attributed_pct']:8.2f}")
    def us(v):
        return "n/a" if v is None else f"{v:.2f}"

    for mode in ("stages", "ops"):
        p(f"split cost (calibration tokens), {mode}: " + ", ".join(us(r["sync_us"]) for r in res.get(mode, []))
          + " us; no-op view " + ", ".join(us(r["noop_sync_us"]) for r in res.get(mode, [])) + " us")
    p("mode agreement, paired by round (the stages sweep's calibration tokens time every node; both calibrated; "
      "max |ops - stages| stage share, pp; the stage's difference [95 % CI], rounds): "
      + ", ".join(_paired(r) for r in res["stages"]))
    p("  the same with the ops tokens raw (as an ops sweep reports them): " + ", ".join(
        f"{r['context']} {'n/a' if v is None else f'{v:.2f}'}"
        for r, v in zip(res["stages"], res["mode_agreement_paired_ops_raw_pp"], strict=True)))
    for key, what in (("mode_agreement_unpaired_raw_pp", "raw"),  # an ops sweep has no calibration token: raw
                      ("mode_agreement_unpaired_pp", "stages calibrated, ops raw")):
        if key in res:
            p(f"mode agreement, unpaired (two sweeps), {what} (max |ops - stages| stage share, pp): "
              + ", ".join(f"{r['context']} {v:.2f}" for r, v in zip(res["stages"], res[key], strict=True)))
    if "depth" in res:
        dd = res["depth"]
        p(f"depth 13->4096: attn_kv +{dd['attn_kv_rise_ms']:.2f} ms/token vs plain wall +{dd['plain_rise_ms']:.2f} "
          f"ms/token (profiled +{dd['profiled_rise_ms']:.2f}); disagreement {dd['disagreement_pct']:+.1f} %")
        p("  per-stage rise ms/token: " + " ".join(f"{k}={v:+.2f}" for k, v in dd["stage_rise_ms"].items()))
    for r in res["roofline"]:
        gb = " ".join(f"{k}={v:.1f}" for k, v in r["stage_gbps"].items())
        p(f"roofline {r['context']:7}: {r['bytes_per_token'] / 2**20:7.1f} MiB/token ({r['bytes_source']}) -> "
          f"{r['roofline_ms']:.2f} ms; "
          f"measured/roofline {r['measured_over_roofline']:.2f}; achieved GB/s {gb}")
    sc = res["sweep_cost"]
    p(f"sweep cost: {sc['wall_s']:.1f} s wall for the default sweep (load {sc['load_s']:.1f} s), "
      f"{sc['prefill_tokens']} prefill tokens")
    if "twin" in res and "error" in res["twin"]:
        p(f"twin generation failed: {res['twin']['error']}")
    elif "twin" in res:
        t = res["twin"]
        p(f"twin generation (E4B Q4_K_M): {t['wall_s']:.1f} s, peak RSS {t['peak_rss_gib']:.2f} GiB, "
          f"{t['file_gb']:.2f} GB")


def _paired(r: dict) -> str:
    if not r.get("mode_worst"):
        return f"{r['context']} n/a"
    s, pp, ci = r["mode_worst"]
    return f"{r['context']} {abs(pp):.2f} ({s} {pp:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") \
        + f", {r['ops_rounds']})"


def main(argv: list[str] | None = None) -> int:
    return run_cli("suite.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
