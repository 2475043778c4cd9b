/* mll_guard.h - the boundary that C++ exceptions do not cross.
 *
 * llama.cpp is C++ and throws from some paths that its C API does not catch:
 * tokenizing with a SentencePiece vocabulary that lacks a byte token
 * (std::out_of_range from unordered_map::at), a malformed precompiled
 * charsmap, a grammar the parser chokes on, chat templates, token ids outside
 * the vocabulary, and std::bad_alloc anywhere. mullama's extensions are C, so
 * an exception reaching them calls std::terminate and kills the interpreter.
 *
 * Every llama.cpp call that can throw goes through one of these wrappers
 * instead. Each takes the same arguments as the llama.cpp function it wraps
 * (`mll_` instead of `llama_`), catches every exception, and returns a
 * sentinel:
 *
 *   int32_t results        MLL_CXX_ERROR (INT32_MIN)
 *   size_t results         0
 *   pointers               NULL
 *   llama_token            LLAMA_TOKEN_NULL
 *   void functions         return int: 0 done, -1 exception
 *
 * The exception's type and message are kept in a per-thread buffer that
 * mll_guard_error() returns ("" when the last guarded call on this thread did
 * not throw; every guarded call clears it first). The buffer is not
 * allocated, so even std::bad_alloc is reported. Where a sentinel is also a
 * value llama.cpp returns on its own (NULL from mll_model_chat_template for
 * "no template", INT32_MIN from llama_tokenize when the token count overflows
 * int32), a non-empty mll_guard_error() is what says an exception was caught.
 *
 * No wrapper touches Python or takes a lock: they may be called without the
 * GIL. GGML_ASSERT / GGML_ABORT inside llama.cpp call abort() and cannot be
 * caught here.
 */
#ifndef MLL_GUARD_H
#define MLL_GUARD_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
#define MLL_GUARD_NOEXCEPT noexcept
extern "C" {
#else
#define MLL_GUARD_NOEXCEPT
#endif

/* Compiled into each extension module that links llama: keep the symbols
 * private to it, so modules never resolve each other's copy (or buffer). */
#if defined(__GNUC__)
#define MLL_GUARD_API __attribute__((visibility("hidden")))
#else
#define MLL_GUARD_API
#endif

#define MLL_CXX_ERROR INT32_MIN
#define MLL_GUARD_ERROR_CAP 512

/* The last exception caught on this thread, "std::out_of_range: unordered_map::at"
 * style; "" when the last guarded call did not throw. Valid until the next
 * guarded call on this thread. */
MLL_GUARD_API const char * mll_guard_error(void) MLL_GUARD_NOEXCEPT;

/* ---- model and context */

MLL_GUARD_API struct llama_model * mll_model_load_from_file(
        const char * path_model, struct llama_model_params params) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API struct llama_context * mll_init_from_model(
        struct llama_model * model, struct llama_context_params params) MLL_GUARD_NOEXCEPT;

/* ggml_backend_rpc_add_server, called through the pointer the RPC registry
 * hands out (the backend may not be built in). NULL when it threw or when the
 * server has no devices. It still aborts when the server cannot be reached or
 * does not answer the handshake: callers check the connection first. */
MLL_GUARD_API ggml_backend_reg_t mll_rpc_add_server(
        ggml_backend_reg_t (*add_server)(const char * endpoint), const char * endpoint) MLL_GUARD_NOEXCEPT;

/* NULL is also llama.cpp's answer for "no template": tell them apart with
 * mll_guard_error()[0]. */
MLL_GUARD_API const char * mll_model_chat_template(
        const struct llama_model * model, const char * name) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_model_desc(
        const struct llama_model * model, char * buf, size_t buf_size) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_model_meta_key_by_index(
        const struct llama_model * model, int32_t i, char * buf, size_t buf_size) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_model_meta_val_str_by_index(
        const struct llama_model * model, int32_t i, char * buf, size_t buf_size) MLL_GUARD_NOEXCEPT;

/* ---- text */

MLL_GUARD_API int32_t mll_tokenize(
        const struct llama_vocab * vocab, const char * text, int32_t text_len,
        llama_token * tokens, int32_t n_tokens_max,
        bool add_special, bool parse_special) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_detokenize(
        const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
        char * text, int32_t text_len_max,
        bool remove_special, bool unparse_special) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_token_to_piece(
        const struct llama_vocab * vocab, llama_token token, char * buf,
        int32_t length, int32_t lstrip, bool special) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int32_t mll_chat_apply_template(
        const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
        bool add_ass, char * buf, int32_t length) MLL_GUARD_NOEXCEPT;

/* ---- evaluation and sampling */

MLL_GUARD_API int32_t mll_decode(
        struct llama_context * ctx, struct llama_batch batch) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API llama_token mll_sampler_sample(
        struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API int mll_sampler_accept(
        struct llama_sampler * smpl, llama_token token) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API struct llama_sampler * mll_sampler_init_grammar(
        const struct llama_vocab * vocab, const char * grammar_str,
        const char * grammar_root) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API struct llama_sampler * mll_sampler_init_grammar_lazy_patterns(
        const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
        const char ** trigger_patterns, size_t num_trigger_patterns) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API struct llama_sampler * mll_sampler_clone(
        const struct llama_sampler * smpl) MLL_GUARD_NOEXCEPT;

/* ---- grammar-constrained sampling
 *
 * A full grammar pass over a large vocabulary costs more than a decode step
 * (tens of ms for 262k tokens), while checking one token costs microseconds.
 * So the stream's own choice comes first and the grammar only judges it; when
 * it is rejected, the best-scoring tokens are tried before the whole vocabulary.
 */

/* Returned by mll_sample_constrained when the grammar allows no token at all. */
#define MLL_NO_TOKEN (-2)

/* 1 when `grammar` allows `token` next, 0 when not, -1 on an exception. */
MLL_GUARD_API int mll_grammar_allows(
        struct llama_sampler * grammar, llama_token token) MLL_GUARD_NOEXCEPT;

/* The next token from the logits row `logits` (n_vocab values):
 *  - `chain` is the stream's sampler chain, or NULL for plain greedy, when
 *    `greedy_token` is the row's argmax (already computed by the caller);
 *  - the choice is checked against `grammar`; if rejected, the chain (or
 *    argmax) chooses again among the tokens the grammar allows. `fast_k` > 0
 *    says the choice depends only on the fast_k best allowed tokens (1 for
 *    greedy; a chain starting with top-k and no penalties or biases): they are
 *    looked for among the highest logits first, and the grammar judges the
 *    whole row (into `cand`, room for n_vocab entries) only when too few of
 *    those are allowed. *full_pass: 0 first choice kept, 1 replaced from the
 *    highest logits, 2 replaced after a pass over the whole vocabulary;
 *  - the chosen token is accepted by the chain and, unless it ends the
 *    generation (end-of-generation is only allowed where the grammar may end),
 *    by the grammar.
 * Returns the token, MLL_NO_TOKEN when nothing is allowed, or LLAMA_TOKEN_NULL
 * when llama.cpp threw. */
MLL_GUARD_API llama_token mll_sample_constrained(
        const struct llama_vocab * vocab, const float * logits, int32_t n_vocab,
        struct llama_sampler * chain, struct llama_sampler * grammar, llama_token greedy_token,
        int32_t fast_k, llama_token_data * cand, int * full_pass) MLL_GUARD_NOEXCEPT;

/* ---- sequence state */

MLL_GUARD_API size_t mll_state_seq_get_size(
        struct llama_context * ctx, llama_seq_id seq_id) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API size_t mll_state_seq_get_data(
        struct llama_context * ctx, uint8_t * dst, size_t size,
        llama_seq_id seq_id) MLL_GUARD_NOEXCEPT;

MLL_GUARD_API size_t mll_state_seq_set_data(
        struct llama_context * ctx, const uint8_t * src, size_t size,
        llama_seq_id dest_seq_id) MLL_GUARD_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif /* MLL_GUARD_H */
