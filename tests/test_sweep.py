"""The sweep through the real llama.cpp on tiny twins: structure of the runs it writes."""

from __future__ import annotations

import pytest
from conftest import run_cli

from harness import columns, stages, store
from harness.store import read_meta, read_run

N_LAYER = 25  # the tiny preset: layers 0-19 own a KV cache, 20-24 reuse it


def _sweep(model, out, *extra):
    r = run_cli("harness.sweep", "--model", str(model), "--tokens", "2", "--repeats", "1", "--warmup", "1",
                "--no-probe", "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    (path,) = sorted(out.glob("*.parquet"))
    return path, r


@pytest.fixture(scope="module")
def ops_fa_on(tiny_gguf, tmp_path_factory):
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("ops_on"), "-c", "13,40", "--mode", "ops", "-fa", "on")[0]


@pytest.fixture(scope="module")
def ops_fa_off(tiny_gguf, tmp_path_factory):
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("ops_off"), "-c", "13,40", "--mode", "ops", "-fa", "off")[0]


def test_stage_sweep_writes_readable_run(tiny_run, tiny_gguf):
    run = read_run(tiny_run)
    ops = run.ops
    assert list(ops.columns) == list(columns.OP_COLUMNS)
    assert len(ops) > 0
    assert ops[columns.STAGE].notna().all() and set(ops[columns.STAGE]) <= set(stages.STAGES)
    assert (ops[columns.TIME_US] >= 0).all()
    # every timed token is decoded at exactly the requested depth
    assert ops.groupby(columns.CONTEXT)[columns.DEPTH].unique().map(list).to_dict() == {
        "short": [13], "40": [40], "80": [80]}
    tokens = run.tokens
    assert set(tokens[columns.PASS]) == {"plain", "profiled"}
    assert len(tokens) == 3 * 2 * 3 * 2  # contexts x repeats x tokens x passes
    assert (tokens[columns.WALL_US] > 0).all()
    # one host row per profiled token
    assert (ops[columns.STAGE] == stages.HOST).sum() == 3 * 2 * 3


def test_metadata_round_trips(tiny_run, tiny_gguf):
    meta = read_meta(tiny_run)
    assert meta["schema_version"] == store.SCHEMA_VERSION
    assert meta["complete"] is True and meta["synthetic"] is True and meta["model"]["synthetic"] is True
    assert meta["label"] == "tiny-2t"
    assert meta["params"]["threads"] == 2 and meta["params"]["mode"] == "stages"
    assert [c["depth"] for c in meta["params"]["contexts"]] == [13, 40, 80]
    assert meta["model"]["arch"] == "gemma3n" and meta["model"]["content_hash"].startswith("sha256s:")
    assert meta["model"]["file_bytes"] == tiny_gguf.stat().st_size
    assert meta["engine_version"] and "CPU" in meta["system_info"]
    for key in ("os", "cpu_model", "physical_cores", "logical_cores", "ram_bytes", "peak_rss_bytes"):
        assert key in meta["device"]
    ctxs = meta["contexts"]
    assert [c["context"] for c in ctxs] == ["short", "40", "80"]
    for c in ctxs:
        assert c["overhead_ratio"] > 0 and c["plain_ms"] > 0
        assert abs(sum(c["stage_pct"].values()) - c["attributed_pct"]) < 1e-6
        assert c["sensors_before"]["t_unix"] <= c["sensors_after"]["t_unix"]
    from harness.gguf_model import ModelInfo, read_model

    assert ModelInfo.from_dict(meta["model"]["gguf"]) == read_model(tiny_gguf)


def test_summary_printed(tiny_gguf, tmp_path):
    _, r = _sweep(tiny_gguf, tmp_path, "-c", "short")
    assert "overhead" in r.stdout and "short" in r.stdout and "attributed" in r.stdout


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
    store = ops[ops[columns.STAGE] == stages.KV_STORE]
    assert sorted(set(store[columns.LAYER])) == list(range(20))
    assert set(ops.loc[ops[columns.NAME].str.startswith("ffn_out"), columns.STAGE]) == {stages.FFN}
    lm = ops[ops[columns.STAGE] == stages.LM_HEAD]
    assert "MUL_MAT" in set(lm[columns.OP]) and "result_output" in set(lm[columns.NAME])
    assert len(ops[ops[columns.STAGE] == stages.GEMMA3N_EXTRA]) > 0


def test_ops_mode_times_every_node(ops_fa_on):
    run = read_run(ops_fa_on)
    ops = run.ops[run.ops[columns.STAGE] != stages.HOST]
    n_nodes = run.meta["contexts"][0]["n_nodes"]
    one = ops[(ops[columns.CONTEXT] == "short") & (ops[columns.STEP] == 0)]
    assert list(one[columns.NODE]) == list(range(n_nodes))
    assert (one[columns.NODE_FIRST] == one[columns.NODE]).all()


def test_flash_attention_off_names_kq(ops_fa_off):
    ops = read_run(ops_fa_off).ops
    names = set(ops[columns.NAME])
    for n in ("kq-0", "kq_soft_max-0", "kqv-0", "kq-24", "kqv_out-24"):
        assert n in names
    kv = ops[ops[columns.NAME].str.match(r"^(kq|kq_soft_max|kqv)-\d+$")]
    assert set(kv[columns.STAGE]) == {stages.ATTN_KV}
    assert "FLASH_ATTN_EXT" not in set(ops[columns.OP])


def test_non_gemma_architecture_classifies(tiny_llama_gguf, tmp_path):
    path, _ = _sweep(tiny_llama_gguf, tmp_path, "-c", "13", "--mode", "ops")
    run = read_run(path)
    ops = run.ops
    assert run.meta["model"]["arch"] == "llama"
    assert ops[columns.STAGE].notna().all()
    seen = set(ops[columns.STAGE])
    assert {stages.FFN, stages.ATTN_KV, stages.ATTN_PROJ, stages.LM_HEAD, stages.NORM} <= seen
    assert stages.GEMMA3N_EXTRA not in seen
    assert set(ops.loc[ops[columns.NAME].str.match(r"^ffn_(up|gate|down)-\d+$"), columns.STAGE]) == {stages.FFN}


def test_thread_list_makes_one_run_per_count(tiny_gguf, tmp_path):
    r = run_cli("harness.sweep", "--model", str(tiny_gguf), "-c", "13", "-n", "2", "-r", "1", "--warmup", "0",
                "--no-probe", "--out", str(tmp_path), "--threads", "1,2")
    assert r.returncode == 0, r.stderr
    runs = sorted(tmp_path.glob("*.parquet"))
    assert sorted(read_meta(p)["params"]["threads"] for p in runs) == [1, 2]


def test_python_callback_fallback_gives_the_same_structure(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_PYTHON_CALLBACK", "1")
    path, _ = _sweep(tiny_gguf, tmp_path, "-c", "13", "--mode", "ops")
    run = read_run(path)
    assert run.meta["params"]["callback"] == "python"
    one = run.ops[(run.ops[columns.STEP] == 0) & (run.ops[columns.STAGE] != stages.HOST)]
    assert list(one[columns.NODE]) == list(range(run.meta["contexts"][0]["n_nodes"]))


def test_native_callback_is_used_when_a_compiler_exists(tiny_run):
    import shutil

    expected = "native" if (shutil.which("cc") or shutil.which("gcc")) else "python"
    assert read_meta(tiny_run)["params"]["callback"] == expected
