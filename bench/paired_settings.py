"""Two engine settings measured in the same rounds: plain decode, every (setting, depth) resident at once.

    python bench/paired_settings.py --vary flash_attn=on,off [--contexts 13,1024,2048,4096] [--rounds 40]
                                    [--model GGUF] [--threads N] [--warmup 2]

``robust.py --vary`` alternates whole sweeps, so a difference in plain ms between its two settings is a
difference between two moments. Here each round decodes one token in every context, plain (no callback:
the engine's own ms/token), in an order that rotates from round to round, and the settings are compared
within rounds. Each setting's contexts share prefill as a sweep's do (a deeper one starts from a copy of
the shallower cache), so prefill costs max(L) tokens per setting. Prints per depth each setting's mean
ms/token and the ratio A / B (ratio of the means over rounds, 95 % bootstrap interval over rounds); per
setting the rise from the shallowest to the deepest depth (paired by round); and the depth where the two
settings' ms/token cross (linear between the neighbouring depths whose paired difference changes sign).
Saves the figures as JSON in bench/results/. Nothing is asserted.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import parse_vary, save_results  # noqa: E402

from harness import device, stats  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.config import SweepConfig, parse_contexts  # noqa: E402
from harness.engine import Context, Model  # noqa: E402
from harness.errors import UsageError  # noqa: E402
from harness.model_cache import read_model  # noqa: E402
from harness.orchestrate import check_model, prompt_tokens  # noqa: E402
from harness.runner import grow, round_order  # noqa: E402
from harness.twin import ensure_default_model  # noqa: E402

CONTEXT_SETTINGS = ("threads", "flash_attn", "cache_type_k", "cache_type_v", "n_ubatch")  # per context, not model


def measure(model: Model, cfg: SweepConfig, arms: list[tuple[str, str]], prompt: list[int], rounds: int,
            warmup: int) -> np.ndarray:
    """(rounds, arms, depths) plain ms/token; every context resident, each round in a rotating order."""
    depths = [d for _, d in cfg.contexts]
    tok = prompt[-1]
    with ExitStack() as stack:
        ctxs = []
        for key, value in arms:
            ecfg = dataclasses.replace(cfg.engine_config(cfg.threads), **{key: value})
            prev = None
            for d in depths:
                c = stack.enter_context(Context(model, ecfg))
                grow(c, prev, prompt, d)  # a restored state, as a sweep's contexts have
                for _ in range(warmup):
                    c.step(tok)
                ctxs.append(c)
                prev = c
            print(f"{key}={value}: {len(depths)} depths resident", flush=True)
        ms = np.full((rounds, len(ctxs)), np.nan)
        for r in range(rounds):
            for i in round_order(len(ctxs), r):
                ms[r, i] = ctxs[i].step(tok) / 1e6
            if (r + 1) % 10 == 0 or r + 1 == rounds:
                print(f"round {r + 1}/{rounds}", flush=True)
    return ms.reshape(rounds, len(arms), len(depths))


def paired(ms: np.ndarray, depths: list[int]) -> dict:
    """Figures of (rounds, 2 arms, depths) ms: per depth the means, A / B of the means with a 95 % interval from
    a bootstrap over rounds, and the paired A - B; per arm the paired rise; where A - B changes sign."""
    rows = stats.boot_indices(ms.shape[0])
    mean = ms.mean(axis=0)  # (arms, depths)
    boot = ms[rows].mean(axis=1)  # (boot, arms, depths)
    ratio_ci = stats.interval(boot[:, 0] / boot[:, 1])
    d_mean, d_boot = mean[0] - mean[1], boot[:, 0] - boot[:, 1]  # the paired difference: a mean of differences
    rise = ms[:, :, -1] - ms[:, :, 0]  # (rounds, arms)
    rise_ci = stats.interval(rise[rows].mean(axis=1))
    once = [c[0] if len(c) == 1 else np.nan for c in (_crossings(d, depths) for d in d_boot)]
    return {"depths": depths, "mean_ms": mean.tolist(), "ratio": (mean[0] / mean[1]).tolist(),
            "ratio_ci": ratio_ci.T.tolist(), "diff_ms": d_mean.tolist(),
            "diff_ci_ms": stats.interval(d_boot).T.tolist(),
            "rise_ms": rise.mean(axis=0).tolist(), "rise_ci_ms": rise_ci.T.tolist(),
            "crossover_depths": _crossings(d_mean, depths),
            "crossover_ci": stats.interval(np.array(once)).tolist() if np.isfinite(once).any() else None,
            "crossover_share": float(np.isfinite(once).mean())}


def _crossings(d_mean: np.ndarray, depths: list[int]) -> list[float]:
    """Depths where the mean difference changes sign, linear between the neighbouring depths."""
    steps = zip(depths, depths[1:], d_mean, d_mean[1:], strict=False)
    return [float(d0 + (d1 - d0) * a / (a - b)) for d0, d1, a, b in steps if a * b < 0]


def report(f: dict, names: list[str]) -> None:
    a, b = names
    print(f"\nplain ms/token, both settings in the same rounds ({a} / {b}):")
    for i, d in enumerate(f["depths"]):
        (lo, hi), (d0, d1) = f["ratio_ci"][i], f["diff_ci_ms"][i]
        print(f"  depth {d}: {f['mean_ms'][0][i]:.2f} vs {f['mean_ms'][1][i]:.2f} ms; x{f['ratio'][i]:.3f} "
              f"[{lo:.3f}, {hi:.3f}]; difference {f['diff_ms'][i]:+.2f} ms [{d0:+.2f}, {d1:+.2f}]")
    for k, n in enumerate(names):
        lo, hi = f["rise_ci_ms"][k]
        print(f"  rise {f['depths'][0]} -> {f['depths'][-1]} with {n}: {f['rise_ms'][k]:+.2f} ms "
              f"[{lo:+.2f}, {hi:+.2f}]")
    cross, ci, share = f["crossover_depths"], f["crossover_ci"], 100 * f["crossover_share"]
    where = (f"; 95 % interval [{ci[0]:.0f}, {ci[1]:.0f}] over the resamples that cross once" if ci and cross else "")
    print(("  the two cross near depth " + ", ".join(f"{c:.0f}" for c in cross) if cross
           else "  the two do not cross between the depths measured")
          + f" (linear between neighbours{where}; {share:.0f} % of resamples of the rounds cross exactly once)")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="paired_settings.py", description=__doc__.split("\n")[0])
    ap.add_argument("--vary", required=True, metavar="SETTING=A,B",
                    help=f"two values of one setting ({', '.join(CONTEXT_SETTINGS)})")
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--contexts", default="13,1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="threads where not varied (default: physical cores)")
    a = ap.parse_args(argv)
    arms = parse_vary(a.vary)
    if len(arms) != 2 or arms[0][0] not in CONTEXT_SETTINGS:
        raise UsageError(f"--vary takes one of {', '.join(CONTEXT_SETTINGS)} with two values, not {a.vary!r}")
    cfg = SweepConfig(contexts=parse_contexts(a.contexts), rounds=a.rounds, warmup=a.warmup,
                      threads=device.physical_cores() if a.threads is None else a.threads).validate()
    arm_cfgs = [cfg.replace(**{key: value}).validate() for key, value in arms]
    path = ensure_default_model() if a.model is None else Path(a.model)
    info = read_model(path)
    for c in arm_cfgs:  # each as if all 2 x depths contexts were its own: an upper bound of the need
        check_model(c, path, info)
    with Model(path) as model:
        prompt = prompt_tokens(model, info.synthetic, cfg.max_depth)
        ms = measure(model, cfg, arms, prompt, a.rounds, a.warmup)
    names = [f"{k}={v}" for k, v in arms]
    f = paired(ms, [d for _, d in cfg.contexts])
    report(f, names)
    save_results("paired-settings", {"args": vars(a), "settings": names, "threads": cfg.threads, "model": str(path),
                                     "synthetic": info.synthetic, **f, "ms": ms.tolist()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("paired_settings.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
