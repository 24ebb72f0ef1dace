"""The sweep through the real llama.cpp on tiny twins: structure of the runs it writes."""

from __future__ import annotations

import os

import pytest
from conftest import run_cli

from analysis.run_facts import engine_rows
from harness import checks, columns, stages
from harness.record import SCHEMA_VERSION, RunRecord
from harness.runner import round_order
from harness.store import read_record, read_run

N_LAYER = 25  # the tiny preset: layers 0-19 own a KV cache, 20-24 reuse it
ROUNDS = 6  # conftest's tiny_run


def _sweep(model, out, *extra):
    r = run_cli("harness.sweep", "--model", str(model), "--rounds", "2", "--warmup", "1", "--no-probe",
                "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    (path,) = sorted(out.glob("*.parquet"))
    return path, r


@pytest.fixture(scope="module")
def ops_fa_on(tiny_gguf, tmp_path_factory):
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("ops_on"), "-c", "13,40", "--mode", "ops", "-fa", "on")[0]


@pytest.fixture(scope="module")
def ops_fa_off(tiny_gguf, tmp_path_factory):
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("ops_off"), "-c", "13,40", "--mode", "ops", "-fa", "off")[0]


def test_stage_sweep_writes_readable_run(tiny_run):
    run = read_run(tiny_run)
    ops = run.ops
    assert list(ops.columns) == list(columns.OP_COLUMNS)
    assert ops[columns.STAGE].notna().all() and set(ops[columns.STAGE]) <= set(stages.STAGES)
    assert (ops[columns.TIME_US] >= 0).all()
    # every timed token is decoded at exactly the requested depth
    assert ops.groupby(columns.CONTEXT)[columns.DEPTH].unique().map(list).to_dict() == {
        "short": [13], "40": [40], "80": [80]}
    tokens = run.tokens
    assert tokens.groupby(columns.CONTEXT)[columns.DEPTH].unique().map(list).to_dict() == {
        "short": [13], "40": [40], "80": [80]}
    # every round decodes every depth once per pass, plus one calibration token at a rotating depth
    per_round = tokens.groupby([columns.ROUND, columns.PASS]).size().unstack()
    assert list(per_round.index) == list(range(ROUNDS))
    assert (per_round[columns.PLAIN] == 3).all() and (per_round[columns.PROFILED] == 3).all()
    assert (per_round[columns.CALIBRATION] == 1).all()
    cal = tokens[tokens[columns.PASS] == columns.CALIBRATION].sort_values(columns.ROUND)
    assert list(cal[columns.DEPTH]) == [[13, 40, 80][r % 3] for r in range(ROUNDS)]
    prof = tokens[tokens[columns.PASS] == columns.PROFILED]
    assert (cal[columns.SPLITS].to_numpy() > prof[columns.SPLITS].max()).all()  # extra splits really happened
    assert (tokens[columns.WALL_US] > 0).all()
    assert (ops[columns.STAGE] == stages.HOST).sum() == 3 * ROUNDS  # one host row per profiled token


def test_calibration_token_is_kept_per_stage_at_its_rounds_depth(tiny_run):
    run = read_run(tiny_run)
    rows = run.calibration_stages
    cal = run.tokens[run.tokens[columns.PASS] == columns.CALIBRATION].set_index(columns.ROUND)
    assert sorted(set(rows[columns.ROUND])) == list(range(ROUNDS))
    for r, one in rows.groupby(columns.ROUND):  # one token per round, at that round's calibration depth
        assert set(one[columns.DEPTH]) == {cal.loc[r, columns.DEPTH]} == {[13, 40, 80][r % 3]}
        assert one[columns.SEGMENTS].sum() == cal.loc[r, columns.SPLITS] == run.record.contexts[0].n_nodes
        assert one[columns.TIME_US].sum() == pytest.approx(cal.loc[r, columns.WALL_US], rel=1e-6)  # host included
        assert set(one[columns.STAGE]) <= set(stages.STAGES) and stages.HOST in set(one[columns.STAGE])
    for c in run.record.contexts:  # each depth compared with the stages tokens of its own calibration rounds
        assert c.ops_rounds == 2 and set(c.mode_diff_pp) == set(stages.STAGES)
        assert not c.mode_diff_pp_ci  # two rounds: too few for an interval (stats.MODE_MIN_ROUNDS)
        assert sum(c.ops_pct_calibrated.values()) == pytest.approx(100.0)
        assert c.mode_agreement_pp == max(abs(v) for v in c.mode_diff_pp.values())
    worst = max(run.record.contexts, key=lambda c: c.mode_agreement_pp)
    fact = dict(engine_rows(run.record))["stage shares, every node timed"]  # the report's run facts
    assert f"depth {worst.depth}, 2 rounds" in fact and f"{worst.mode_agreement_pp:.2f} points" in fact


def test_rounds_rotate_the_order(tiny_run):
    rec = read_record(tiny_run)
    orders = [list(r.order) for r in rec.rounds]
    assert [r.round for r in rec.rounds] == list(range(ROUNDS))
    assert orders == [[[13, 40, 80][j] for j in round_order(3, r)] for r in range(ROUNDS)]
    assert {tuple(o) for o in orders} != {tuple(orders[0])}  # not the same order every round
    assert all(sorted(o) == [13, 40, 80] for o in orders)
    # each depth is decoded first in some round: no depth always runs in the same slot
    assert {o[0] for o in orders} == {13, 40, 80}


@pytest.mark.parametrize("n", range(1, 8))
def test_round_order_is_balanced_for_any_number_of_depths(n):
    """Over a cycle every depth takes every slot equally often and follows every other depth equally often. The
    rotation used before kept each depth in slots of its index's parity when n was even (n = 2: one order)."""
    from collections import Counter

    rows = [round_order(n, r) for r in range(2 * (n if n % 2 == 0 else 2 * n))]
    assert all(sorted(row) == list(range(n)) for row in rows)
    assert len(set(Counter((d, s) for row in rows for s, d in enumerate(row)).values())) == 1
    pairs = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1
    assert all(rows[2 * k] == rows[2 * k + 1] for k in range(len(rows) // 2))  # plain first, then profiled first


def test_segments_never_overlap_and_fit_in_the_wall_time(tiny_run):
    """Structural checks that catch capture bugs: within one profiled token the segments are contiguous, in node
    order, never overlap, and the span they cover plus host equals the profiled wall time of that token."""
    run = read_run(tiny_run)
    ops, tokens = run.ops, run.tokens
    prof = tokens[tokens[columns.PASS] == columns.PROFILED].set_index([columns.CONTEXT, columns.ROUND])
    for (ctx, rnd), seg in ops.groupby([columns.CONTEXT, columns.ROUND]):
        timed = seg[seg[columns.STAGE] != stages.HOST]
        first, last = timed[columns.NODE_FIRST].to_numpy(), timed[columns.NODE].to_numpy()
        assert first[0] == 0 and (first[1:] == last[:-1] + 1).all() and (last >= first).all()
        wall = prof.loc[(ctx, rnd), columns.WALL_US]
        covered = timed[columns.TIME_US].sum()
        host = seg.loc[seg[columns.STAGE] == stages.HOST, columns.TIME_US].sum()
        assert covered <= wall * 1.0001
        assert abs(covered + host - wall) <= 0.01 * wall
        assert prof.loc[(ctx, rnd), columns.SPLITS] == len(timed)


def test_record_round_trips_and_describes_the_run(tiny_run, tiny_gguf):
    rec = read_record(tiny_run)
    assert RunRecord.from_dict(rec.to_dict()) == rec
    assert rec.schema_version == SCHEMA_VERSION and rec.complete and rec.synthetic and rec.model.synthetic
    assert rec.label == "tiny-2t" and rec.params.threads == 2 and rec.params.mode == "stages"
    assert rec.params.order == "round-robin" and rec.params.rounds == ROUNDS and len(rec.rounds) == ROUNDS
    assert rec.params.flash_attn_resolved is True  # auto resolves to flash attention on this CPU build
    assert [c.depth for c in rec.params.contexts] == [13, 40, 80]
    assert rec.model.arch == "gemma3n" and rec.model.content_hash.startswith("sha256s:")
    assert rec.model.file_bytes == tiny_gguf.stat().st_size
    assert rec.engine_version and "CPU" in rec.system_info
    assert rec.device.cpu_model and rec.device.physical_cores and rec.device.peak_rss_bytes
    # conftest sets OMP_WAIT_POLICY for the sweeps it runs: the run records it and its facts show it
    assert rec.params.thread_env["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
    assert f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" in dict(engine_rows(rec))["thread environment"]
    assert [c.context for c in rec.contexts] == ["short", "40", "80"]
    for c in rec.contexts:
        lo, hi = c.plain_ms_ci
        assert lo <= c.plain_ms <= hi and c.timed_tokens == ROUNDS
        assert c.sync_us is not None and c.sync_us_ci is not None
        assert c.sensors_before.t_unix <= c.sensors_after.t_unix
        # calibrated stage ms = raw minus segments x split cost, never more than raw
        assert all(c.stage_ms_calibrated[s] <= c.stage_ms[s] + 1e-9 for s in stages.STAGES)
    inv = rec.invariants  # the depth-invariance check ran on the invariant stages
    assert inv is not None and inv.stage in checks.INVARIANT_STAGES and set(inv.per_stage_pct) <= set(
        checks.INVARIANT_STAGES)
    assert inv.max_disagreement_pct == inv.per_stage_pct[inv.stage] == max(
        inv.per_stage_pct[s] for s in inv.per_stage_pct if min(c.share(s) for c in rec.contexts) >= 5.0)
    assert ("drift" in {f.kind for f in rec.flags}) == (inv.max_disagreement_pct > inv.threshold_pct)
    assert set(inv.noise_floor_pct) == set(inv.per_stage_pct) and all(v > 0 for v in inv.noise_floor_pct.values())
    assert inv.step_ratio == {} and set(inv.judged) <= set(inv.per_stage_pct)  # 6 rounds: too few for 5 a side
    assert "synthetic" in {f.kind for f in rec.flags}
    from harness.gguf_model import ModelInfo, read_model

    assert ModelInfo.from_dict(rec.model.gguf) == read_model(tiny_gguf)


def test_summary_printed(tiny_gguf, tmp_path):
    _, r = _sweep(tiny_gguf, tmp_path, "-c", "short")
    assert "plain ms/tok" in r.stdout and "short" in r.stdout and "sum/plain" in r.stdout
    assert "every node timed (the calibration tokens) minus stages mode, same rounds: 13: " in r.stdout


def test_a_calibration_token_with_some_extra_splits_is_no_ops_mode_token(tiny_gguf, tmp_path):
    rec = read_record(_sweep(tiny_gguf, tmp_path, "-c", "short", "--calib-splits", "5")[0])
    assert rec.calibrated and not rec.calibration_stages and rec.contexts[0].mode_agreement_pp is None


def test_every_layer_has_ffn_and_attention(ops_fa_on):
    ops = read_run(ops_fa_on).ops
    ops = ops[ops[columns.CONTEXT] == "short"]
    for stage in (stages.FFN, stages.ATTN_KV, stages.ATTN_PROJ):
        layers = set(ops.loc[ops[columns.STAGE] == stage, columns.LAYER])
        assert set(range(N_LAYER)) <= layers, (stage, sorted(set(range(N_LAYER)) - layers))
    fa = ops[ops[columns.OP] == "FLASH_ATTN_EXT"]
    assert sorted(set(fa[columns.LAYER])) == list(range(N_LAYER))  # shared-KV layers attend too
    assert set(fa[columns.STAGE]) == {stages.ATTN_KV}
    # only the 20 KV-owning layers store into the cache
    kv_store = ops[ops[columns.STAGE] == stages.KV_STORE]
    assert sorted(set(kv_store[columns.LAYER])) == list(range(20))
    assert set(ops.loc[ops[columns.NAME].str.startswith("ffn_out"), columns.STAGE]) == {stages.FFN}
    lm = ops[ops[columns.STAGE] == stages.LM_HEAD]
    assert "MUL_MAT" in set(lm[columns.OP]) and "result_output" in set(lm[columns.NAME])
    assert len(ops[ops[columns.STAGE] == stages.GEMMA3N_EXTRA]) > 0


def test_ops_mode_times_every_node(ops_fa_on):
    run = read_run(ops_fa_on)
    ops = run.ops[run.ops[columns.STAGE] != stages.HOST]
    n_nodes = run.record.contexts[0].n_nodes
    one = ops[(ops[columns.CONTEXT] == "short") & (ops[columns.ROUND] == 0)]
    assert list(one[columns.NODE]) == list(range(n_nodes))
    assert (one[columns.NODE_FIRST] == one[columns.NODE]).all()
    assert not run.record.calibration_stages and not any(c.mode_diff_pp for c in run.record.contexts)  # no stages


def test_flash_attention_off_names_kq(ops_fa_off):
    run = read_run(ops_fa_off)
    ops = run.ops
    names = set(ops[columns.NAME])
    for n in ("kq-0", "kq_soft_max-0", "kqv-0", "kq-24", "kqv_out-24"):
        assert n in names
    kv = ops[ops[columns.NAME].str.match(r"^(kq|kq_soft_max|kqv)-\d+$")]
    assert set(kv[columns.STAGE]) == {stages.ATTN_KV}
    assert "FLASH_ATTN_EXT" not in set(ops[columns.OP])
    assert run.record.params.flash_attn_resolved is False


def test_non_gemma_architecture_classifies(tiny_llama_gguf, tmp_path):
    path, _ = _sweep(tiny_llama_gguf, tmp_path, "-c", "13", "--mode", "ops")
    run = read_run(path)
    ops = run.ops
    assert run.record.model.arch == "llama"
    assert ops[columns.STAGE].notna().all()
    seen = set(ops[columns.STAGE])
    assert {stages.FFN, stages.ATTN_KV, stages.ATTN_PROJ, stages.LM_HEAD, stages.NORM} <= seen
    assert stages.GEMMA3N_EXTRA not in seen
    assert set(ops.loc[ops[columns.NAME].str.match(r"^ffn_(up|gate|down)-\d+$"), columns.STAGE]) == {stages.FFN}


def test_one_depth_run_gets_the_check_over_rounds_and_no_depth_comparison(tiny_gguf, tmp_path):
    path, r = _sweep(tiny_gguf, tmp_path, "-c", "40", "-r", "12")
    inv = read_record(path).invariants
    assert not inv.across_depths and inv.stage == "" and inv.judged and not inv.noise_floor_pct
    assert set(inv.judged) <= set(inv.step_ratio) and all(5 <= k <= 7 for k in inv.step_round.values())
    assert "over rounds: largest step" in r.stdout and "largest disagreement" not in r.stdout
    t = run_cli("analysis.table", str(path))
    assert t.returncode == 0, t.stderr
    assert "Depth-invariant stages agree" not in t.stdout and "FLAG drift" not in t.stdout


def test_list_settings_run_their_product(tiny_gguf, tmp_path):
    r = run_cli("harness.sweep", "--model", str(tiny_gguf), "-c", "13", "-r", "1", "--warmup", "0",
                "--no-probe", "--out", str(tmp_path), "--threads", "1,2", "-fa", "on,off")
    assert r.returncode == 0, r.stderr
    recs = [read_record(p) for p in sorted(tmp_path.glob("*.parquet"))]
    assert sorted((x.params.threads, x.params.flash_attn) for x in recs) == [
        (1, "off"), (1, "on"), (2, "off"), (2, "on")]
    assert {(x.params.flash_attn, x.params.flash_attn_resolved) for x in recs} == {("on", True), ("off", False)}


def test_python_callback_fallback_gives_the_same_structure(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_PYTHON_CALLBACK", "1")
    path, _ = _sweep(tiny_gguf, tmp_path, "-c", "13", "--mode", "ops")
    run = read_run(path)
    assert run.record.params.callback == "python"
    one = run.ops[(run.ops[columns.ROUND] == 0) & (run.ops[columns.STAGE] != stages.HOST)]
    assert list(one[columns.NODE]) == list(range(run.record.contexts[0].n_nodes))


def test_native_callback_is_used_when_a_compiler_exists(tiny_run):
    import shutil

    expected = "native" if (shutil.which("cc") or shutil.which("gcc")) else "python"
    assert read_record(tiny_run).params.callback == expected
