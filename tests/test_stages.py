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
        s.GEMMA3N_EXTRA, s.GEMMA3N_EXTRA, s.LM_HEAD, s.LM_HEAD, s.LM_HEAD, s.OTHER,
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


def test_one_tensor_to_stage_mapping_keyed_on_gguf_names():
    import gguf

    T = gguf.MODEL_TENSOR
    assert set(s.TENSOR_STAGES) == set(gguf.TENSOR_NAMES)  # every gguf-py tensor kind has a stage
    assert s.gguf_tensor("blk.12.ffn_up.weight") is T.FFN_UP
    assert s.gguf_tensor("blk.0.post_attention_norm.weight") is T.ATTN_POST_NORM
    assert s.gguf_tensor("Qcur-0") is None and s.gguf_tensor("attn_inp_kq_mask") is None
    expect = {
        "blk.3.ffn_down.weight": s.FFN, "blk.3.attn_q.weight": s.ATTN_PROJ, "blk.3.attn_q.bias": s.ATTN_PROJ,
        "blk.3.attn_q_norm.weight": s.ATTN_PROJ, "blk.3.attn_k_norm.weight": s.ATTN_PROJ,  # Qcur_normed, Kcur_normed
        "blk.3.attn_norm.weight": s.NORM, "blk.3.post_ffw_norm.weight": s.NORM, "output_norm.weight": s.NORM,
        "output.weight": s.LM_HEAD, "token_embd.weight": s.LM_HEAD,  # multiplied: the tied LM head
        # Gemma 3n norms and scales that AltUp / LAuReL / per-layer-input nodes multiply (issue 13 d)
        "blk.3.altup_router_norm.weight": s.GEMMA3N_EXTRA, "blk.3.laurel_post_norm.weight": s.GEMMA3N_EXTRA,
        "blk.3.post_norm.weight": s.GEMMA3N_EXTRA, "per_layer_proj_norm.weight": s.GEMMA3N_EXTRA,
        "blk.3.altup_correct_scale.weight": s.GEMMA3N_EXTRA, "per_layer_token_embd.weight": s.GEMMA3N_EXTRA,
    }
    assert {n: s.tensor_stage(n) for n in expect} == expect
    assert s.tensor_stage("token_embd.weight", "GET_ROWS") == s.OTHER  # the embd lookup
    assert s.tensor_stage("inp_embd") is None


def test_altup_layer_output_copy_is_gemma3n_extra():
    # the tail of a Gemma 3n layer and the head of the next one (names as llama.cpp gives them)
    nodes = [
        ("first_prediction_out-0", "MUL", "norm-0", "blk.0.post_norm.weight"),
        ("node_123", "ADD", "corrected-0 (view)", "first_prediction_out-0"),  # corrected[1:] += first_prediction
        ("l_out-0", "CONCAT", "corrected-0 (view)", "node_123"),
        ("l_out-0 (permuted)", "PERMUTE", "l_out-0", ""),
        ("l_out-0 (permuted) (cont)", "CONT", "l_out-0 (permuted)", ""),  # layer 1's altup_predict input
        ("l_out-0 (view)", "VIEW", "l_out-0", ""),
        ("norm-1", "RMS_NORM", "l_out-0 (view)", ""),
        ("node_129", "MUL", "norm-1", "blk.1.altup_router_norm.weight"),
        ("node_131", "MUL_MAT", "blk.1.altup_router.weight", "node_130"),
    ]
    assert s.classify_graph(nodes) == [s.GEMMA3N_EXTRA] * len(nodes)
    assert s.classify_graph([n[:3] for n in nodes]) == [s.GEMMA3N_EXTRA] * len(nodes)  # capture's triples too
    llama = [("ffn_out-1", "MUL_MAT", "blk.1.ffn_down.weight"), ("l_out-1", "ADD", "ffn_out-1")]
    assert s.classify_graph(llama) == [s.FFN, s.OTHER]  # elsewhere l_out is the residual add


def test_global_weights_have_no_layer():
    nodes = [
        ("node_1", "GET_ROWS", "per_layer_token_embd.weight"),
        ("node_5", "REPEAT", "inp_scaled"),
        ("node_6", "MUL_MAT", "altup_proj.weight"),
        ("Qcur-0", "MUL_MAT", "blk.0.attn_q.weight"),
        ("l_out-34", "CONCAT", "corrected-34 (view)"),
        ("l_out-34 (view)", "VIEW", "l_out-34"),
        ("node_3100", "MUL_MAT", "altup_unembd_proj.weight"),  # the final AltUp unembed projection
        ("l_out-34 (view)", "VIEW", "l_out-34"),
        ("node_3102", "SQR", "l_out-34 (view)"),
        ("altup_unembd", "DIV", "node_3101"),
    ]
    assert s.classify_layers(nodes) == [-1, -1, -1, 0, 34, 34, -1, 34, -1, -1]


def test_f32_cache_cast_for_flash_attention_is_attention_not_a_store():
    """``ggml_cast`` names its result "<view> (copy)"; a ``ggml_cpy`` into the cache is "<dst> (copy of <src>)"."""
    cast, store = "cache_k_l18 (view) (permuted) (copy)", "cache_k_l3 (view) (copy of Kcur-3)"
    assert s.is_cache_cast(cast, "CPY") and not s.is_cache_cast(store, "CPY")
    assert s.classify_own(cast, "CPY", "cache_k_l18 (view) (permuted)") == s.ATTN_KV
    assert s.classify_own(store, "CPY", "Kcur-3") == s.KV_STORE
    nodes = [(cast, "CPY", "cache_k_l18 (view) (permuted)"), ("__fattn__-22", "FLASH_ATTN_EXT", "q-22")]
    assert s.classify_layers(nodes) == [22, 22]  # the reading layer, not the cache's owner
