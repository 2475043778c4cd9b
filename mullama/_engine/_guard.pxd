# Declarations of include/mullama/mll_guard.h: llama.cpp calls behind a C++
# try/catch, so no exception reaches these C extensions. No logic here.
# Pinned llama.cpp: commit 0c1e57098 (vendor/llama.cpp.pin).

from libc.stdint cimport int32_t, uint8_t

from mullama._engine._ggml_backend cimport ggml_backend_reg_t
from mullama._engine._rpc cimport rpc_add_server_fn
from mullama._engine._llama cimport (
    llama_batch, llama_chat_message, llama_context, llama_context_params, llama_model,
    llama_model_params, llama_sampler, llama_seq_id, llama_token, llama_token_data, llama_vocab,
)

cdef extern from "mullama/mll_guard.h" nogil:
    int32_t MLL_CXX_ERROR
    int MLL_GUARD_ERROR_CAP

    const char * mll_guard_error()

    # model and context
    llama_model * mll_model_load_from_file(const char * path_model, llama_model_params params)
    llama_context * mll_init_from_model(llama_model * model, llama_context_params params)
    const char * mll_model_chat_template(const llama_model * model, const char * name)
    int32_t mll_model_desc(const llama_model * model, char * buf, size_t buf_size)
    int32_t mll_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size)
    int32_t mll_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf,
                                            size_t buf_size)

    # text
    int32_t mll_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                         llama_token * tokens, int32_t n_tokens_max,
                         bint add_special, bint parse_special)
    int32_t mll_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                           char * text, int32_t text_len_max, bint remove_special,
                           bint unparse_special)
    int32_t mll_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                               int32_t length, int32_t lstrip, bint special)
    int32_t mll_chat_apply_template(const char * tmpl, const llama_chat_message * chat,
                                    size_t n_msg, bint add_ass, char * buf, int32_t length)

    # evaluation and sampling
    int32_t mll_decode(llama_context * ctx, llama_batch batch)
    llama_token mll_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx)
    int mll_sampler_accept(llama_sampler * smpl, llama_token token)
    llama_sampler * mll_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                             const char * grammar_root)
    llama_sampler * mll_sampler_init_grammar_lazy_patterns(const llama_vocab * vocab, const char * grammar_str,
                                                           const char * grammar_root,
                                                           const char ** trigger_patterns,
                                                           size_t num_trigger_patterns)
    llama_sampler * mll_sampler_clone(const llama_sampler * smpl)

    # grammar-constrained sampling
    int MLL_NO_TOKEN
    int mll_grammar_allows(llama_sampler * grammar, llama_token token)
    llama_token mll_sample_constrained(const llama_vocab * vocab, const float * logits, int32_t n_vocab,
                                       llama_sampler * chain, llama_sampler * grammar,
                                       llama_token greedy_token, int32_t fast_k, llama_token_data * cand,
                                       int * full_pass)

    # sequence state
    size_t mll_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id)
    size_t mll_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id)
    size_t mll_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size,
                                  llama_seq_id dest_seq_id)

    # RPC backend (mullama/_engine/_rpc.pxd)
    ggml_backend_reg_t mll_rpc_add_server(rpc_add_server_fn add_server, const char * endpoint)
