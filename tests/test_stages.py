"""Stage rules on hand-written node lists (pure unit tests of harness.stages)."""

from harness import stages as s


def test_base_name_strips_layer_and_view_suffixes():
    assert s.base_name("Qcur_pos-3 (view) (permuted)") == ("Qcur_pos", 3)
    assert s.base_name("norm") == ("norm", -1)
    assert s.base_name(" (reshaped)") == ("", -1)


def test_gemma3n_layer_fragment():
    nodes = [
        ("embd", "GET_ROWS", "token_embd.weight"),
        ("node_1", "GET_ROWS", "per_layer_token_embd.weight"),
        ("norm-0", "RMS_NORM", "x"),
        ("attn_norm-0", "MUL", "norm-0"),
        ("Qcur-0", "MUL_MAT", "blk.0.attn_q.weight"),
        ("norm-0", "RMS_NORM", "Qcur-0"),
        ("Qcur_normed-0", "MUL", "norm-0"),
        ("cache_k_l0 (view)", "SET_ROWS", "Kcur_pos-0 (view)"),
        ("cache_k_l0 (view)", "VIEW", "cache_k_l0"),
        ("node_56", "FLASH_ATTN_EXT", "Qcur_pos-0 (view) (permuted)"),
        ("kqv_out-0", "RESHAPE", "node_56"),
        ("node_58", "MUL_MAT", "blk.0.attn_output.weight"),
        ("node_62", "MUL_MAT", "blk.0.laurel_l.weight"),
        ("node_71", "MUL_MAT", "blk.0.ffn_up.weight"),
        ("node_73", "MEAN", "node_72"),  # activation sparsity, unnamed
        ("node_83", "GELU", "node_82"),
        ("ffn_out-0", "MUL_MAT", "blk.0.ffn_down.weight"),
        ("norm", "RMS_NORM", "ffn_out-0"),
        ("ffn_post_norm-0", "MUL", "norm"),
        ("node_97", "MUL_MAT", "blk.0.altup_correct_coef.weight"),
        ("l_out-0", "CONCAT", "corrected-0 (view)"),
        ("node_2337", "MUL_MAT", "token_embd.weight"),
        ("node_2339", "TANH", "node_2338"),
        ("result_output", "SCALE", "node_2339"),
        ("mystery_op-0", "ADD", "x"),
    ]
    got = s.classify_graph(nodes)
    assert got == [
        s.OTHER, s.GEMMA3N_EXTRA, s.NORM, s.NORM, s.ATTN_PROJ, s.ATTN_PROJ, s.ATTN_PROJ, s.KV_STORE, s.ATTN_KV,
        s.ATTN_KV, s.ATTN_PROJ, s.ATTN_PROJ, s.GEMMA3N_EXTRA, s.FFN, s.FFN, s.FFN, s.FFN, s.NORM, s.NORM,
        s.GEMMA3N_EXTRA, s.OTHER, s.LM_HEAD, s.LM_HEAD, s.LM_HEAD, s.OTHER,
    ]
    layers = s.classify_layers(nodes)
    assert layers[7] == 0 and layers[9] == 0 and layers[13] == 0 and layers[0] == -1


def test_llama_fragment_and_unknown_nodes():
    nodes = [
        ("ffn_up-1", "MUL_MAT", "blk.1.ffn_up.weight"),
        ("ffn_swiglu-1", "GLU", "ffn_up-1"),
        ("ffn_down-1", "MUL_MAT", "blk.1.ffn_down.weight"),
        ("kq-1", "MUL_MAT", "cache_k_l1 (view)"),
        ("kq_soft_max-1", "SOFT_MAX", "kq-1"),
        ("kqv-1", "MUL_MAT", "cache_v_l1 (view)"),
        ("result_norm", "MUL", "norm"),
        ("result_output", "MUL_MAT", "output.weight"),
        ("node_999", "ADD", "x"),  # trailing unnamed node: nothing after it decides, so other
    ]
    assert s.classify_graph(nodes) == [s.FFN, s.FFN, s.FFN, s.ATTN_KV, s.ATTN_KV, s.ATTN_KV, s.NORM, s.LM_HEAD,
                                       s.OTHER]


def test_shared_kv_cache_view_takes_reader_layer():
    nodes = [("cache_k_l18 (view)", "VIEW", "cache_k_l18"), ("node_5", "FLASH_ATTN_EXT", "q"),
             ("kqv_out-23", "RESHAPE", "node_5")]
    assert s.classify_layers(nodes) == [23, 23, 23]


def test_noop_views_join_their_consumer():
    nodes = [
        ("cache_k_l5 (view)", "SET_ROWS", "Kcur_pos-5 (view)"),
        ("Vcur_normed-5 (view)", "VIEW", "Vcur_normed-5"),  # feeds the V store
        ("cache_v_l5 (view)", "SET_ROWS", "Vcur_normed-5 (view)"),
        ("Qcur_pos-5 (view) (permuted)", "PERMUTE", "Qcur_pos-5 (view)"),  # feeds attention
        ("node_566", "FLASH_ATTN_EXT", "Qcur_pos-5 (view) (permuted)"),
    ]
    assert s.classify_graph(nodes) == [s.KV_STORE, s.KV_STORE, s.KV_STORE, s.ATTN_KV, s.ATTN_KV]
