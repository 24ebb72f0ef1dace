"""The read model against hand-worked arithmetic on the E4B Q4_K_M twin's tensor table, and the seed baseline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from analysis import baseline
from analysis import readmodel as rm
from harness import presets, stages
from harness.errors import InputError, UsageError
from harness.gguf_model import read_model

ROOT = Path(__file__).resolve().parent.parent
E4B_FILE = ROOT / "models" / "gemma-3n-e4b-q4.gguf"
MIB = 1024**2

# ggml block sizes: Q4_K 256 elements -> 144 bytes, Q6_K 256 -> 210, F16 2 bytes, F32 4 bytes
Q4K, Q6K = 144 / 256, 210 / 256
E, FF, VOCAB, ALT, N_LAYER = 2048, 16384, 262400, 256, 35
# llama.cpp's Q4_K_M gives ffn_down and attn_v Q6_K in "more bits" layers: the first and last eighth
# (0-3, 30-34) and every third layer between ((il - 4) % 3 == 2: 6, 9, ..., 27)
MORE_BITS = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34]
KV_OWNERS = 20  # gemma3n: layers 0-19 own a cache, 20-34 reuse layer 18's or 19's
GLOBAL_LAYERS = [4, 9, 14, 19, 24, 29, 34]  # il % 5 == 4; the other 28 slide over 512 cells
CELL = 2 * 256 * 2 * 2  # n_head_kv x head_dim x (K and V) x f16 bytes, per layer and cached token


def e4b_exact(variant: str = "exact", **kw) -> rm.ReadModel:
    return rm.from_model_info(presets.model_info("gemma-3n-e4b", "q4_k_m"), variant, **kw)


@pytest.mark.skipif(not (E4B_FILE.exists() and os.environ.get("HARNESS_E4B_TESTS")),
                    reason="set HARNESS_E4B_TESTS=1 with models/gemma-3n-e4b-q4.gguf present (parsing it takes ~10 s)")
def test_preset_model_info_matches_the_twin_file():
    info = read_model(E4B_FILE)
    assert info.tensors == presets.model_info("gemma-3n-e4b").tensors
    a, b = rm.from_model_info(info), e4b_exact()
    assert a.weight_bytes == b.weight_bytes and a.kv_layers == b.kv_layers


def test_e4b_weight_stages_by_hand():
    b = e4b_exact().bytes_per_token(13)
    n_more = len(MORE_BITS)
    ffn = N_LAYER * 2 * E * FF * Q4K + n_more * FF * E * Q6K + (N_LAYER - n_more) * FF * E * Q4K
    assert b[stages.FFN] == ffn == 2128871424  # 2030.25 MiB
    v_more = sum(il in MORE_BITS for il in range(KV_OWNERS))  # 9 of the 20 KV-owning layers
    attn_proj = (N_LAYER * 2 * E * E * Q4K  # attn_q and attn_output in every layer
                 + KV_OWNERS * E * 512 * Q4K  # attn_k in KV-owning layers
                 + v_more * E * 512 * Q6K + (KV_OWNERS - v_more) * E * 512 * Q4K  # attn_v
                 + N_LAYER * 256 * 4 + KV_OWNERS * 256 * 4)  # attn_q_norm, attn_k_norm: Qcur_normed/Kcur_normed
    assert b[stages.ATTN_PROJ] == attn_proj == 191176704 + 55 * 1024
    assert b[stages.LM_HEAD] == E * VOCAB * Q6K == 440832000  # tied token_embd, Q6_K
    assert b[stages.OTHER] == E * Q6K  # one token_embd row: the embd GET_ROWS is in other
    per_layer_extra = (2 * E * ALT * Q4K  # inp_gate, proj
                       + (4 * 4 + 4 * 16) * 4 + 2 * E * 4 * 2  # altup correct/predict coefs (F32), router twice (F16)
                       + 2 * E * 64 * 2  # laurel_l, laurel_r (F16, rank 64)
                       + 5 * E * 4)  # router norm twice, laurel post-norm, per-layer post-norm, altup_correct_scale
    extra = (E * ALT * N_LAYER * 2 + 2 * E * E * 3 * 2  # per_layer_model_proj, altup projs
             + ALT * N_LAYER * Q6K + ALT * 4  # one per_layer_token_embd row, per_layer_proj_norm
             + N_LAYER * per_layer_extra)
    assert b[stages.GEMMA3N_EXTRA] == extra
    assert b[stages.NORM] == N_LAYER * 4 * E * 4 + E * 4  # attn, post-attn, ffn, post-ffw norms; output_norm
    assert b[stages.KV_STORE] == KV_OWNERS * CELL
    assert set(b) == set(stages.STAGES) - {stages.HOST}


@pytest.mark.parametrize(("depth", "expected"), [
    (13, 35 * 14 * CELL),
    (172, 35 * 173 * CELL),
    (658, 7 * 659 * CELL + 28 * 512 * CELL),
    (4096, 7 * 4097 * CELL + 28 * 512 * CELL),
])
def test_e4b_kv_read_by_hand(depth, expected):
    m = e4b_exact()
    assert len(m.kv_layers) == 35 and m.n_kv_owners == KV_OWNERS
    assert [lay.layer for lay in m.kv_layers if not lay.sliding] == GLOBAL_LAYERS
    assert m.window_cells == 512
    assert m.bytes_per_token(depth)[stages.ATTN_KV] == expected
    assert m.total_bytes_per_token(depth) == pytest.approx(sum(m.bytes_per_token(depth).values()))


def test_e4b_kv_variants_and_cache_types():
    # no flash attention: n_kv = min(cache, max(256, PAD(L+1, 256))) cells in every layer, sliding ones included
    padded = e4b_exact("exact_padded")  # n_ctx 0: the context ends at the decoded token
    assert not padded.flash_attn and e4b_exact().flash_attn
    assert padded.bytes_per_token(13)[stages.ATTN_KV] == 35 * 256 * CELL  # 14 cells padded to 256
    assert padded.bytes_per_token(13)[stages.ATTN_KV] / MIB == pytest.approx(17.5)  # issue 13 (a)
    # the default sweep (n_ctx 659): sliding cache PAD(min(768, 512 + 512), 256) = 768 cells, all read
    sweep = e4b_exact("exact_padded", n_ctx=659)
    assert sweep.bytes_per_token(658)[stages.ATTN_KV] == 35 * 768 * CELL
    deep = e4b_exact("exact_padded", n_ctx=4097)  # sliding cache 1,024 cells; global 4,352
    assert deep.bytes_per_token(658)[stages.ATTN_KV] == 35 * 768 * CELL
    assert deep.bytes_per_token(4096)[stages.ATTN_KV] == 7 * 4352 * CELL + 28 * 1024 * CELL
    # a copied-in state keeps only the window's 512 cells in the sliding cache: 513 used -> 768 read, not 1,024
    restored = e4b_exact("exact_padded", n_ctx=4097, restored=True)
    assert restored.bytes_per_token(4096)[stages.ATTN_KV] == 7 * 4352 * CELL + 28 * 768 * CELL
    assert restored.bytes_per_token(172)[stages.ATTN_KV] == deep.bytes_per_token(172)[stages.ATTN_KV]
    small_ub = e4b_exact("exact_padded", n_ctx=4097, n_ubatch=256)  # sliding cache PAD(512 + 256) = 768
    assert small_ub.bytes_per_token(4096)[stages.ATTN_KV] == 7 * 4352 * CELL + 28 * 768 * CELL
    # definitions: shared-KV layers' reads are counted and split out; GQA re-reads are split out, not counted
    m = e4b_exact()
    assert m.kv_shared_read_bytes(172) == 15 * 173 * CELL
    assert m.kv_gqa_reread_bytes(172) == 3 * m.kv_read_bytes(172)  # 8 query heads over 2 KV heads
    assert [lay.cache_layer for lay in m.kv_layers[18:]] == [18, 19] + [18, 18, 18, 18, 19] * 3
    q8 = e4b_exact(cache_type_k="q8_0", cache_type_v="q8_0")
    assert q8.bytes_per_token(13)[stages.ATTN_KV] == 35 * 14 * (2 * 256 * 2 * 34 / 32)
    mixed = e4b_exact(cache_type_k="f32", cache_type_v="q4_0")
    assert mixed.kv_layers[0].cell_bytes == 2 * 256 * (4 + 18 / 32)
    assert e4b_exact().kv_cache_bytes(658) == 4 * 658 * CELL + 16 * 512 * CELL  # only KV-owning layers hold cells
    with pytest.raises(UsageError):
        e4b_exact(cache_type_k="q9_9")
    with pytest.raises(UsageError):
        e4b_exact("bogus")


def test_weight_bytes_sum_to_the_tensors_read_each_token():
    info = presets.model_info("gemma-3n-e4b", "q4_k_m")
    m = rm.from_model_info(info)
    b = m.bytes_per_token(0)
    weights = sum(v for k, v in b.items() if k not in (stages.ATTN_KV, stages.KV_STORE))
    tables = {"token_embd.weight", "per_layer_token_embd.weight"}
    shared = {f"blk.{il}.{n}.weight" for il in range(KV_OWNERS, N_LAYER) for n in ("attn_k", "attn_v", "attn_k_norm")}
    read = sum(t.n_bytes for t in info.tensors if t.name not in tables | shared)
    rows = sum(t.n_bytes / t.shape[1] for t in info.tensors if t.name in tables)
    tied_head = info.tensor("token_embd.weight").n_bytes
    router_again = sum(t.n_bytes for t in info.tensors if ".altup_router" in t.name)  # predict and correct
    assert weights == pytest.approx(read + rows + tied_head + router_again, abs=1e-6)
    assert m.footprint_bytes == info.tensor_bytes


def test_plain_architecture_reduces_to_the_plain_formula():
    info = presets.model_info("tiny-llama", "q8_0")
    m = rm.from_model_info(info)
    assert m.window_cells == 0 and m.n_kv_owners == 2 and not any(lay.sliding for lay in m.kv_layers)
    cell = 1 * 128 * 2 * 2
    for depth in (0, 13, 1000):
        assert m.bytes_per_token(depth)[stages.ATTN_KV] == 2 * (depth + 1) * cell
    b = m.bytes_per_token(5)
    assert b[stages.LM_HEAD] == info.tensor("output.weight").n_bytes
    assert b[stages.OTHER] == info.tensor("token_embd.weight").n_bytes / 1024  # the embd lookup row
    assert b[stages.GEMMA3N_EXTRA] == 0


def test_from_run_uses_the_runs_tensor_table(tiny_run, tiny_gguf):
    from harness.store import read_record

    rec = read_record(tiny_run)
    a, b = rm.from_run(rec), rm.from_gguf(tiny_gguf)
    assert a.weight_bytes == b.weight_bytes and a.kv_layers == b.kv_layers
    assert a.n_kv_owners == 20 and len(a.kv_layers) == 25 and a.window_cells == 32
    assert a.bytes_per_token(80)[stages.ATTN_KV] == sum(lay.cell_bytes * (81 if not lay.sliding else 32)
                                                        for lay in a.kv_layers)
    assert rm.from_run(rec, "seed") == rm.seed_model()
    with pytest.raises(InputError):
        rm.from_run(rec.replace(model=rec.model.replace(gguf=None)))


def test_seed_reproduces_the_seed_notebook():
    m = rm.seed_model()
    assert m.variant == "seed"
    for depth, kv_mb, ratio in ((13, 0.89, 0.001), (172, 11.76, 0.007), (658, 44.98, 0.027)):
        b = m.bytes_per_token(depth)
        assert round(b[stages.ATTN_KV] / MIB, 2) == kv_mb
        assert round(m.kv_cache_bytes(depth) / MIB, 2) == kv_mb
        assert round(b[stages.FFN] / MIB, 1) == 1680.0
        assert round(b[stages.ATTN_KV] / b[stages.FFN], 3) == ratio
        assert b[stages.ATTN_KV] == 2 * 35 * 2 * 256 * depth * 2  # L cells, not L + 1
        assert m.total_bytes_per_token(depth) == b[stages.FFN] + b[stages.ATTN_KV]
    assert round(m.footprint_bytes / MIB) == 1855
    assert baseline.FFN_BYTES == 35 * 2048 * 16384 * 3 * 0.5


def test_memory_estimate_sizes_sliding_caches_by_the_window():
    """E4B at n_ctx 4,097: 4 global KV owners of 4,352 cells and 16 sliding ones of 1,024 (not 20 x n_ctx), 2 KiB
    a cell, for each of the depth's two contexts."""
    from harness import orchestrate
    from harness.config import SweepConfig, parse_contexts

    info = presets.model_info("gemma-3n-e4b")
    cfg = SweepConfig(contexts=parse_contexts("4096"))
    logits = cfg.n_ubatch * info.hparams["vocab_size"] * 4
    kv = (4 * 4352 + 16 * 1024) * 2048
    assert orchestrate.estimate_memory_bytes(info, cfg) == info.tensor_bytes + 2 * (
        kv + logits + orchestrate.CONTEXT_OVERHEAD_BYTES)


def test_read_model_counts_selected_experts_and_gemma4_sharing():
    """A MoE expert tensor is read at expert_used_count / expert_count per token (MUL_MAT_ID, as the graph
    counts it); Gemma 4's KV owners stop at n_layer - shared_kv_layers, and its sliding layers' caches use
    key_length_swa / value_length_swa. Made-up records, no file."""
    from harness.gguf_model import ModelInfo, TensorRecord

    exps = TensorRecord(name="blk.0.ffn_up_exps.weight", shape=(64, 32, 8), ggml_type="F16", n_elements=16384,
                        n_bytes=32768)
    hp = {"block_count": 1, "embedding_length": 64, "attention.head_count": 1, "expert_count": 8,
          "expert_used_count": 2}
    moe = ModelInfo(path="<moe>", file_bytes=0, arch="qwen3moe", name="moe", hparams=hp, tensors=(exps,))
    assert rm.weight_bytes_by_stage(moe)["ffn"] == 32768 * 2 / 8
    hp = {"block_count": 6, "embedding_length": 64, "attention.head_count": 2, "attention.head_count_kv": 1,
          "attention.key_length": 128, "attention.value_length": 128, "attention.key_length_swa": 64,
          "attention.value_length_swa": 64, "attention.sliding_window": 32, "attention.shared_kv_layers": 2,
          "attention.sliding_window_pattern": [True, True, True, False, True, False]}
    g4 = ModelInfo(path="<g4>", file_bytes=0, arch="gemma4", name="g4", hparams=hp, tensors=())
    m = rm.from_model_info(g4)
    assert [lay.owns_kv for lay in m.kv_layers] == [True] * 4 + [False] * 2
    assert [lay.cell_bytes for lay in m.kv_layers] == [256, 256, 256, 512, 256, 512]  # f16: 2 B x (dk + dv)
    assert [lay.cache_layer for lay in m.kv_layers][4:] == [2, 3]  # shared: the last sliding / global owner
