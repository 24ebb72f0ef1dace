"""A calibrated time model of one decode step, fitted on a run's round-robin measurements.

    plain(L)   = sum_s c_s + attn_kv(L) + offset
    attn_kv(L) = sum over attention layers l of  a_r + b_r * B_l * n_l(L) / MiB,   r = r(l, L)

- c_s: every stage but ``attn_kv`` (FFN, LM head, projections, ``kv_store``, host, ...) is
  depth-invariant: its calibrated ms/token averaged over the fitting depths.
- offset: plain ms/token minus the sum of calibrated stage ms (what no stage holds), averaged likewise.
- n_l(L): KV cells layer l reads at depth L, B_l its bytes per cell (K + V of its KV heads in the
  run's cache type): the read model's (``ReadModel.kv_cells_read``, i.e. ``harness.gguf_model.kv_cells``
  with the run's n_ctx, n_batch, n_ubatch, flash attention and restored state; a depth past the run's
  n_ctx gets a cache sized for it), so the time model, the read model and the graph bytes count the
  same cells. Sliding layers stop at the window, global layers grow.
- r: the kernel regime of the layer at that depth, as llama.cpp's CPU backend picks it
  (ggml-cpu ``ggml_compute_forward_flash_attn_ext_f16``): with flash attention and f16 K = V (f32 is cast), a
  view of n_kv >= 512 cells (the padded view: ``kv_cells`` without flash attention) splits the KV
  cells across threads (``split-kv``); smaller views and quantized caches split query heads
  (``chunked``); without flash attention the ``kq``/``kqv`` matmuls are one regime (``matmul``).
- a_r (ms per layer: the latency floor seen at small depths) and b_r (ms per MiB read) are least
  squares on the per-depth mean calibrated ``attn_kv`` ms, in one of three forms: ``per-regime``,
  ``shared-slope`` (one b) or ``one-regime`` (one a, one b); a regime no fitting depth reaches uses
  another's parameters. The form is chosen by forward validation (``_choose_form``): fitted without
  the deepest fitting depth, each form that can be fitted without it predicts it; the simplest wins
  unless a richer one predicts it better in >= 90 % of bootstrap resamples (a per-regime line through
  512-2048 cells over-predicts deeper depths on a CPU whose kernel gets cheaper per cell once a
  thread's KV slice leaves L2, and one depth's noise favours the form with more parameters:
  bench/NOTES.md §8b, §21b).

Intervals: every parameter, prediction and crossover is refitted on bootstrap resamples of rounds
(``harness.stats.boot_indices``: depths paired by round, the split cost re-estimated per resample), in
the form chosen once on the data (the choice is not repeated per resample: the intervals are conditional
on it). They hold sampling noise only; how far the model itself carries is what ``validate`` shows on
depths it did not see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from analysis import readmodel, slope
from harness import stages, stats
from harness.errors import InputError
from harness.graph_bytes import split_kv_path
from harness.record import RunRecord

MIB = 1024**2
CHUNKED, SPLIT, MATMUL, OFFLOADED = "chunked", "split-kv", "matmul", "offloaded"
REGIME_TEXT = {CHUNKED: "flash attention, query heads across threads (n_kv < 512 or a quantized cache)",
               SPLIT: "flash attention, KV cells across threads (n_kv >= 512, f16/f32 cache)",
               MATMUL: "no flash attention: kq/kqv matmuls over the n_kv view",
               OFFLOADED: "layers offloaded to a GPU: one regime"}
FORMS = ("per-regime", "shared-slope", "one-regime")  # richest first
RICHER_SHARE = 0.90  # a richer form is taken when it predicts the held-out depth better in this share of resamples
ATTN, FFN = stats.S[stages.ATTN_KV], stats.S[stages.FFN]


@dataclass(frozen=True)
class AttnFacts:
    """The run's attention layers and the contexts they read: its read model (the n_kv rules)."""

    model: readmodel.ReadModel  # exact (flash attention) or exact_padded, with the run's context sizes
    context_length: int  # the model's trained context (0: unknown)
    cpu_kernels: bool = True  # False: layers offloaded to a GPU (the CPU kernel regimes do not apply)

    @classmethod
    def from_run(cls, rec: RunRecord) -> AttnFacts:
        if not readmodel.has_tensor_table(rec):  # readmodel's own message names flags this command lacks
            raise InputError("the run carries no model tensor table: the time model reads each layer's KV bytes there")
        model = readmodel.from_run(rec)
        if not model.kv_layers:
            raise InputError("the run's model has no attention layers with a KV cache: nothing to model")
        hp = (rec.model.gguf or {}).get("hparams", {})
        return cls(model, int(hp.get("context_length") or 0), rec.params.n_gpu_layers == 0)

    @property
    def cache_types(self) -> tuple[str, str]:
        return self.model.cache_type_k, self.model.cache_type_v

    def all_regimes(self) -> tuple[str, ...]:
        if not self.cpu_kernels:
            return (OFFLOADED,)
        return (CHUNKED, SPLIT) if self.model.flash_attn else (MATMUL,)

    def regime(self, view_cells: int) -> str:
        if not self.cpu_kernels:
            return OFFLOADED
        if not self.model.flash_attn:
            return MATMUL
        k, v = ("f16" if t.lower() == "f32" else t.lower() for t in self.cache_types)  # f32 is cast to f16 first
        return SPLIT if split_kv_path(k, v, view_cells) else CHUNKED

    def layer_terms(self, depths) -> tuple[np.ndarray, np.ndarray]:
        """(count, mib), each (N, regimes): attention layers in each regime and the MiB they read, per depth."""
        regs = self.all_regimes()
        kinds: dict[tuple[bool, float, float], list] = {}
        for lay in self.model.kv_layers:
            kinds.setdefault((lay.sliding, lay.cell_bytes, lay.k_cell_bytes), [lay, 0])[1] += 1
        count, mib = np.zeros((len(depths), len(regs))), np.zeros((len(depths), len(regs)))
        for lay, n in kinds.values():
            for i, d in enumerate(depths):
                r = regs.index(self.regime(self.model.kv_cells_read(lay, int(d), flash_attn=False)))
                count[i, r] += n
                mib[i, r] += n * self.model.kv_layer_read_bytes(lay, int(d)) / MIB
        return count, mib


@dataclass(frozen=True, eq=False)
class DepthMeans:
    """Per-depth means over rounds of plain ms and calibrated stage ms, and of their bootstrap resamples."""

    depths: np.ndarray  # (D,)
    plain: np.ndarray  # (D,)
    stage: np.ndarray  # (D, S) calibrated (raw when the run has no calibration tokens)
    plain_boot: np.ndarray  # (B, D)
    stage_boot: np.ndarray  # (B, D, S)
    n_rounds: int
    calibrated: bool


def _means(rd: stats.RoundData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) plain and (B, D, S) calibrated stage means over the round indices ``rows`` (B, R); the split
    cost (``stats.split_cost_ms``) re-estimated from the same rounds."""
    cost = stats.split_cost_ms(rd.calib_delta[rows], rd.calib_extra[rows])  # (B,)
    with np.errstate(all="ignore"):
        st = rd.stage[rows]  # (B, R, D, S)
        c = np.maximum(cost, 0.0)[:, None, None, None]
        cal = np.where(np.isnan(cost)[:, None, None, None], st, np.maximum(st - rd.segs[None, None] * c, 0.0))
        return np.nanmean(rd.plain[rows], axis=1), np.nanmean(cal, axis=1)


def depth_means(rds: stats.RoundData | list[stats.RoundData], n_boot: int = stats.N_BOOT, seed: int = 0,
                chunk: int = 250) -> DepthMeans:
    """Per-depth means of one run, or of several pooled (``analysis.slope.pool_runs``: runs that measured
    different depths are put at one level first; resampled within each run)."""
    rds = [rds] if isinstance(rds, stats.RoundData) else list(rds)
    depths = np.array(sorted({d for rd in rds for d in rd.depths}))
    boots = [stats.boot_indices(len(rd.rounds), n_boot, seed + k) for k, rd in enumerate(rds)]

    def pooled(picks: list[np.ndarray], strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        b = picks[0].shape[0]
        y = np.full((len(rds), len(depths), b, 1 + len(stats.S)), np.nan)  # run, depth, resample, plain + stages
        for i, (rd, rows) in enumerate(zip(rds, picks, strict=True)):
            p, s = _means(rd, rows)
            y[i, np.searchsorted(depths, rd.depths)] = np.concatenate([p[:, :, None], s], axis=2).transpose(1, 0, 2)
        out = slope.pool_runs(y, strict).transpose(1, 0, 2)  # (B, D, 1 + S); a resample may not link the runs
        return out[:, :, 0], out[:, :, 1:]

    plain, stage = pooled([np.arange(len(rd.rounds))[None] for rd in rds], strict=True)
    parts = [pooled([b[i:i + chunk] for b in boots]) for i in range(0, n_boot, chunk)]
    calibrated = any((~np.isnan(rd.calib_delta) & (rd.calib_extra > 0)).any() for rd in rds)
    return DepthMeans(depths, plain[0], stage[0], np.concatenate([p for p, _ in parts]),
                      np.concatenate([s for _, s in parts]), sum(len(rd.rounds) for rd in rds), calibrated)


@dataclass(frozen=True, eq=False)
class TimeModel:
    facts: AttnFacts
    form: str  # FORMS
    own: tuple[str, ...]  # regimes with parameters of their own
    use: dict[str, str]  # every regime -> the regime whose parameters it uses
    theta: np.ndarray  # (P,): a per own regime, then b per own regime (shared-slope: one b; one-regime: a, b)
    theta_boot: np.ndarray  # (B, P)
    const: np.ndarray  # (S,) depth-invariant stage ms/token (attn_kv: 0)
    const_boot: np.ndarray  # (B, S)
    offset: float  # plain - calibrated stage sum, ms/token
    offset_boot: np.ndarray  # (B,)
    fit_depths: tuple[int, ...]
    n_rounds: int
    calibrated: bool
    notes: tuple[str, ...] = ()

    @property
    def param_names(self) -> list[str]:
        if self.form == "one-regime":
            return ["a", "b"]
        return [f"a[{r}]" for r in self.own] + ([f"b[{r}]" for r in self.own] if self.form == "per-regime" else ["b"])

    def design(self, depths) -> np.ndarray:
        """(N, P) design matrix: attn_kv(L) = design(L) @ theta."""
        return _design(*self.facts.layer_terms(depths), self.facts.all_regimes(), self.own, self.use, self.form)

    def to_dict(self) -> dict:
        lo, hi = stats.interval(self.theta_boot)
        return {"form": self.form, "regimes": {r: {"uses": self.use[r], "kernel": REGIME_TEXT[r]} for r in self.use},
                "params": {n: {"value": float(v), "ci": [float(a), float(b)], "unit": "ms/MiB" if n[0] == "b" else
                               "ms/layer"} for n, v, a, b in zip(self.param_names, self.theta, lo, hi, strict=True)},
                "const_ms": {s: float(self.const[i]) for s, i in stats.S.items() if s != stages.ATTN_KV},
                "offset_ms": self.offset, "fit_depths": list(self.fit_depths), "n_rounds": self.n_rounds,
                "calibrated": self.calibrated, "cache_type_k": self.facts.cache_types[0],
                "cache_type_v": self.facts.cache_types[1], "flash_attn": self.facts.model.flash_attn,
                "context_length": self.facts.context_length, "notes": list(self.notes)}


def _design(count: np.ndarray, mib: np.ndarray, regs: tuple[str, ...], own: tuple[str, ...], use: dict[str, str],
            form: str) -> np.ndarray:
    c, m = np.zeros((len(count), len(own))), np.zeros((len(count), len(own)))
    for j, r in enumerate(regs):
        k = own.index(use[r])
        c[:, k] += count[:, j]
        m[:, k] += mib[:, j]
    if form == "per-regime":
        return np.hstack([c, m])
    if form == "shared-slope":
        return np.hstack([c, m.sum(1, keepdims=True)])
    return np.hstack([c.sum(1, keepdims=True), m.sum(1, keepdims=True)])


def _identified(x: np.ndarray) -> bool:
    return x.shape[0] >= x.shape[1] and np.linalg.matrix_rank(x) == x.shape[1]


def _choose_form(forms: list[str], facts: AttnFacts, fd: np.ndarray, attn: np.ndarray, attn_boot: np.ndarray,
                 own: tuple[str, ...], use: dict[str, str]) -> tuple[str, str]:
    """(form, note). Forward validation inside the fitting depths: every form still identified without the
    deepest fitting depth is fitted on the others and predicts it (the model is used to extrapolate, and a
    per-regime line can bend the wrong way past the depths it saw). The simplest such form is taken unless a
    richer one predicts better in >= RICHER_SHARE of the bootstrap resamples (``attn_boot``: (B, depths)): one
    depth's error decides otherwise, and its noise favours the form with more parameters (bench/NOTES.md §21b)."""
    if len(forms) == 1 or len(fd) < 3:
        return forms[0], ""
    (count, mib), deepest = facts.layer_terms(fd[:-1]), facts.layer_terms(fd[-1:])
    regs = facts.all_regimes()
    errors, boot = {}, {}  # each form's error at the deepest depth, and its |error| per resample
    for form in forms:
        x = _design(count, mib, regs, own, use, form)
        if _identified(x):
            w = _design(*deepest, regs, own, use, form) @ np.linalg.pinv(x)  # (1, depths - 1)
            with np.errstate(all="ignore"):
                errors[form] = 100 * ((w @ attn[:-1])[0] / attn[-1] - 1) if attn[-1] > 0 else np.inf
                boot[form] = np.abs(100 * ((attn_boot[:, :-1] @ w[0]) / attn_boot[:, -1] - 1))
    if not errors:
        return forms[0], ""
    simplest_first, pct, parts = sorted(errors, key=FORMS.index, reverse=True), f"{100 * RICHER_SHARE:.0f} %", []
    for i, form in enumerate(simplest_first):  # the simplest form no richer one beats in >= RICHER_SHARE
        wins = {g: float(np.mean(boot[g] < boot[form])) for g in simplest_first[i + 1:]}  # NaN: not a win
        shares = ", ".join(f"{g} better in {100 * w:.0f} %" for g, w in wins.items())
        if not any(w >= RICHER_SHARE for w in wins.values()):
            parts += [f"{form} kept, no richer form better in >= {pct} of resamples ({shares})"] if wins else []
            break
        parts.append(f"{form} beaten ({shares} of resamples)")
    shown = ", ".join(f"{f} {e:+.1f} %" for f, e in errors.items())
    return form, (f"form chosen by forward validation (fitted on {', '.join(map(str, fd[:-1]))}, attn_kv at "
                  f"{fd[-1]} predicted: {shown}; {'; '.join(parts) or 'the only one checked'}): {form}")


def fit(dm: DepthMeans, facts: AttnFacts, fit_depths=None) -> TimeModel:
    """Fit the model on ``fit_depths`` (default: every depth of ``dm``)."""
    fd = np.array(sorted(set(dm.depths.tolist() if fit_depths is None else fit_depths)), dtype=int)
    idx = np.minimum(np.searchsorted(dm.depths, fd), len(dm.depths) - 1)
    if (dm.depths[idx] != fd).any():
        raise InputError(f"fitting depths {', '.join(map(str, fd))} are not all measured "
                         f"(depths: {', '.join(map(str, dm.depths))})")
    if len(fd) < 2:
        raise InputError(f"the time model needs at least 2 fitting depths, got {len(fd)}")
    regs = facts.all_regimes()
    count, mib = facts.layer_terms(fd)
    own = tuple(r for j, r in enumerate(regs) if count[:, j].any())
    use = {r: r if r in own else own[0] for r in regs}
    notes = [f"no fitting depth puts a layer in the {r} regime ({REGIME_TEXT[r]}): such layers use the "
             f"{use[r]} parameters" for r in regs if r not in own]
    forms = [f for f in (FORMS[2:] if len(own) == 1 else FORMS) if _identified(_design(count, mib, regs, own, use, f))]
    if not forms:
        raise InputError(f"cannot fit attention over the KV cache: the fitting depths {', '.join(map(str, fd))} "
                         "do not tell a fixed cost from a per-byte cost (they read the same KV bytes)")
    form, why = _choose_form(forms, facts, fd, dm.stage[idx, ATTN], dm.stage_boot[:, idx, ATTN], own, use)
    notes += [why] if why else []
    x = _design(count, mib, regs, own, use, form)
    if not dm.calibrated:
        notes.append("the run has no calibration tokens: stage times are raw (profiled); the offset absorbs "
                     "the profiling overhead")
    pinv = np.linalg.pinv(x)
    theta = pinv @ dm.stage[idx, ATTN]
    n_b = len(own) if form == "per-regime" else 1  # the b parameters come last
    if (theta[-n_b:] < 0).any():
        notes.append("a fitted per-byte cost is negative: at the fitting depths attention does not grow with the KV "
                     "bytes read (noise?); predictions away from them do not hold")
    const, const_boot = dm.stage[idx].mean(0), dm.stage_boot[:, idx].mean(1)
    const[ATTN], const_boot[:, ATTN] = 0.0, 0.0
    return TimeModel(
        facts=facts, form=form, own=own, use=use, theta=theta,
        theta_boot=(pinv @ dm.stage_boot[:, idx, ATTN].T).T, const=const, const_boot=const_boot,
        offset=float((dm.plain[idx] - dm.stage[idx].sum(1)).mean()),
        offset_boot=(dm.plain_boot[:, idx] - dm.stage_boot[:, idx].sum(2)).mean(1),
        fit_depths=tuple(int(d) for d in fd), n_rounds=dm.n_rounds, calibrated=dm.calibrated, notes=tuple(notes))


def with_kv(base: TimeModel, kv: TimeModel, note: str) -> TimeModel:
    """``base`` with attention over the KV cache and ``kv_store`` taken from ``kv`` (a run with another cache type;
    its bootstrap resamples are independent of ``base``'s, so pairing them resamples the two runs apart)."""
    k = stats.S[stages.KV_STORE]
    const, const_boot = base.const.copy(), base.const_boot.copy()
    const[k], const_boot[:, k] = kv.const[k], kv.const_boot[:, k]
    return dataclasses.replace(base, facts=kv.facts, form=kv.form, own=kv.own, use=kv.use, theta=kv.theta,
                               theta_boot=kv.theta_boot, const=const, const_boot=const_boot,
                               notes=base.notes + kv.notes + (note,))
