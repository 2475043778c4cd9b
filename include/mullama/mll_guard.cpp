// mll_guard.cpp - see mll_guard.h. Needs C++17; compiled into each extension
// module that links llama.

#if __cplusplus < 201703L
#error "mll_guard.cpp needs C++17"
#endif

#include "mll_guard.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <typeinfo>
#include <utility>

namespace {

thread_local char g_error[MLL_GUARD_ERROR_CAP];

void clear_error() noexcept {
    g_error[0] = '\0';
}

void append(std::size_t & at, const char * text) noexcept {
    if (text == nullptr) {
        return;
    }
    std::size_t n = std::strlen(text);
    std::size_t room = MLL_GUARD_ERROR_CAP - 1 - at;
    if (n > room) {
        n = room;
    }
    std::memcpy(g_error + at, text, n);
    at += n;
    g_error[at] = '\0';
}

void set_error(const char * kind, const char * what) noexcept {
    std::size_t at = 0;
    g_error[0] = '\0';
    append(at, kind);
    if (what != nullptr && what[0] != '\0') {
        append(at, ": ");
        append(at, what);
    }
}

// Called from inside a catch handler: names the exception being handled.
// The most derived standard types come first, so the message says what
// llama.cpp actually threw (out_of_range from a map lookup, ...).
void record_current() noexcept {
    try {
        throw;
    } catch (const std::bad_alloc & e) {
        set_error("std::bad_alloc", e.what());
    } catch (const std::out_of_range & e) {
        set_error("std::out_of_range", e.what());
    } catch (const std::invalid_argument & e) {
        set_error("std::invalid_argument", e.what());
    } catch (const std::length_error & e) {
        set_error("std::length_error", e.what());
    } catch (const std::domain_error & e) {
        set_error("std::domain_error", e.what());
    } catch (const std::logic_error & e) {
        set_error("std::logic_error", e.what());
    } catch (const std::range_error & e) {
        set_error("std::range_error", e.what());
    } catch (const std::overflow_error & e) {
        set_error("std::overflow_error", e.what());
    } catch (const std::runtime_error & e) {
        set_error("std::runtime_error", e.what());
    } catch (const std::bad_cast & e) {
        set_error("std::bad_cast", e.what());
    } catch (const std::exception & e) {
        set_error("std::exception", e.what());
    } catch (...) {
        set_error("unknown C++ exception", nullptr);
    }
}

// Run `fn`; on any exception record it and return `failed` instead.
template <typename R, typename F>
R guarded(R failed, F && fn) noexcept {
    clear_error();
    try {
        return std::forward<F>(fn)();
    } catch (...) {
        record_current();
    }
    return failed;
}

}  // namespace

extern "C" {

const char * mll_guard_error(void) noexcept {
    return g_error;
}

// ---- model and context

llama_model * mll_model_load_from_file(const char * path_model, llama_model_params params) noexcept {
    return guarded<llama_model *>(nullptr, [&] { return llama_model_load_from_file(path_model, params); });
}

llama_context * mll_init_from_model(llama_model * model, llama_context_params params) noexcept {
    return guarded<llama_context *>(nullptr, [&] { return llama_init_from_model(model, params); });
}

ggml_backend_reg_t mll_rpc_add_server(ggml_backend_reg_t (*add_server)(const char * endpoint),
                                      const char * endpoint) noexcept {
    return guarded<ggml_backend_reg_t>(nullptr, [&] { return add_server(endpoint); });
}

const char * mll_model_chat_template(const llama_model * model, const char * name) noexcept {
    return guarded<const char *>(nullptr, [&] { return llama_model_chat_template(model, name); });
}

int32_t mll_model_desc(const llama_model * model, char * buf, size_t buf_size) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR, [&] { return llama_model_desc(model, buf, buf_size); });
}

int32_t mll_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf,
                                    size_t buf_size) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR,
                            [&] { return llama_model_meta_key_by_index(model, i, buf, buf_size); });
}

int32_t mll_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf,
                                        size_t buf_size) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR,
                            [&] { return llama_model_meta_val_str_by_index(model, i, buf, buf_size); });
}

// ---- text

int32_t mll_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                     llama_token * tokens, int32_t n_tokens_max,
                     bool add_special, bool parse_special) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR, [&] {
        return llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special);
    });
}

int32_t mll_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                       char * text, int32_t text_len_max,
                       bool remove_special, bool unparse_special) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR, [&] {
        return llama_detokenize(vocab, tokens, n_tokens, text, text_len_max, remove_special,
                                unparse_special);
    });
}

int32_t mll_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                           int32_t length, int32_t lstrip, bool special) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR,
                            [&] { return llama_token_to_piece(vocab, token, buf, length, lstrip, special); });
}

int32_t mll_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg,
                                bool add_ass, char * buf, int32_t length) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR,
                            [&] { return llama_chat_apply_template(tmpl, chat, n_msg, add_ass, buf, length); });
}

// ---- evaluation and sampling

int32_t mll_decode(llama_context * ctx, llama_batch batch) noexcept {
    return guarded<int32_t>(MLL_CXX_ERROR, [&] { return llama_decode(ctx, batch); });
}

llama_token mll_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx) noexcept {
    return guarded<llama_token>(LLAMA_TOKEN_NULL, [&] { return llama_sampler_sample(smpl, ctx, idx); });
}

int mll_sampler_accept(llama_sampler * smpl, llama_token token) noexcept {
    return guarded<int>(-1, [&] {
        llama_sampler_accept(smpl, token);
        return 0;
    });
}

llama_sampler * mll_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                         const char * grammar_root) noexcept {
    return guarded<llama_sampler *>(nullptr,
                                    [&] { return llama_sampler_init_grammar(vocab, grammar_str, grammar_root); });
}

llama_sampler * mll_sampler_init_grammar_lazy_patterns(const llama_vocab * vocab, const char * grammar_str,
                                                       const char * grammar_root, const char ** trigger_patterns,
                                                       size_t num_trigger_patterns) noexcept {
    return guarded<llama_sampler *>(nullptr, [&] {
        return llama_sampler_init_grammar_lazy_patterns(vocab, grammar_str, grammar_root, trigger_patterns,
                                                        num_trigger_patterns, nullptr, 0);
    });
}

llama_sampler * mll_sampler_clone(const llama_sampler * smpl) noexcept {
    return guarded<llama_sampler *>(nullptr, [&] { return llama_sampler_clone(smpl); });
}

// ---- grammar-constrained sampling

namespace {

bool grammar_allows(llama_sampler * grammar, llama_token token) {
    llama_token_data one = {token, 0.0f, 0.0f};
    llama_token_data_array arr = {&one, 1, -1, false};
    llama_sampler_apply(grammar, &arr);
    return one.logit != -INFINITY;
}

void fill_candidates(llama_token_data * cand, const float * logits, int32_t n_vocab) {
    for (int32_t i = 0; i < n_vocab; i++) {
        cand[i] = {i, logits[i], 0.0f};
    }
}

// The chain's choice from `arr` (its last sampler, greedy or dist, sets `selected`).
llama_token chain_choice(llama_sampler * chain, llama_token_data_array & arr) {
    llama_sampler_apply(chain, &arr);
    if (arr.selected < 0 || static_cast<size_t>(arr.selected) >= arr.size) {
        throw std::logic_error("the sampler chain selected no token");
    }
    return arr.data[arr.selected].id;
}

// Candidates of the shortlist: enough that the k best allowed tokens are usually among them.
constexpr size_t MLL_SHORTLIST_MIN = 256;

// The grammar's filter over the row, cheaply where that is exact: when the chain keeps only
// the k highest logits (`fast_k`, 1 for greedy) and nothing before it reorders them, the k
// best allowed tokens decide. They are looked for among the highest logits first; only when
// fewer than k of those are allowed does the grammar judge the whole vocabulary (returns
// true then). Leaves the allowed candidates in `arr` (the rest at -inf or cut off).
bool grammar_filter(llama_sampler * grammar, const float * logits, int32_t n_vocab, int32_t fast_k,
                    llama_token_data * cand, llama_token_data_array & arr) {
    fill_candidates(cand, logits, n_vocab);
    size_t m = std::max(MLL_SHORTLIST_MIN, 4 * static_cast<size_t>(std::max(fast_k, 0)));
    if (fast_k > 0 && m < static_cast<size_t>(n_vocab)) {
        auto higher = [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; };
        std::nth_element(cand, cand + m, cand + n_vocab, higher);
        std::sort(cand, cand + m, higher);
        arr = {cand, m, -1, true};
        llama_sampler_apply(grammar, &arr);
        size_t allowed = 0;
        for (size_t i = 0; i < m; i++) {
            if (cand[i].logit != -INFINITY) {
                cand[allowed++] = cand[i];
            }
        }
        if (allowed >= static_cast<size_t>(fast_k)) {
            arr = {cand, allowed, -1, true};
            return false;
        }
        fill_candidates(cand, logits, n_vocab);
    }
    arr = {cand, static_cast<size_t>(n_vocab), -1, false};
    llama_sampler_apply(grammar, &arr);
    return true;
}

}  // namespace

int mll_grammar_allows(llama_sampler * grammar, llama_token token) noexcept {
    return guarded<int>(-1, [&] { return grammar_allows(grammar, token) ? 1 : 0; });
}

llama_token mll_sample_constrained(const llama_vocab * vocab, const float * logits, int32_t n_vocab,
                                   llama_sampler * chain, llama_sampler * grammar, llama_token greedy_token,
                                   int32_t fast_k, llama_token_data * cand, int * full_pass) noexcept {
    return guarded<llama_token>(LLAMA_TOKEN_NULL, [&]() -> llama_token {
        *full_pass = 0;
        llama_token token = greedy_token;
        llama_token_data_array arr = {cand, static_cast<size_t>(n_vocab), -1, false};
        if (chain != nullptr) {
            fill_candidates(cand, logits, n_vocab);
            token = chain_choice(chain, arr);
        }
        if (!grammar_allows(grammar, token)) {
            *full_pass = grammar_filter(grammar, logits, n_vocab, fast_k, cand, arr) ? 2 : 1;
            token = LLAMA_TOKEN_NULL;
            float best = -INFINITY;
            for (size_t i = 0; i < arr.size; i++) {
                if (arr.data[i].logit > best) {
                    best = arr.data[i].logit;
                    token = arr.data[i].id;
                }
            }
            if (token == LLAMA_TOKEN_NULL) {
                return MLL_NO_TOKEN;
            }
            if (chain != nullptr) {
                token = chain_choice(chain, arr);
                // a logit bias of -inf can ban every token the grammar allows
                if (!(arr.data[arr.selected].logit > -INFINITY)) {
                    return MLL_NO_TOKEN;
                }
            }
        }
        if (chain != nullptr) {
            llama_sampler_accept(chain, token);
        }
        if (!llama_vocab_is_eog(vocab, token)) {
            llama_sampler_accept(grammar, token);
        }
        return token;
    });
}

// ---- sequence state

size_t mll_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id) noexcept {
    return guarded<size_t>(0, [&] { return llama_state_seq_get_size(ctx, seq_id); });
}

size_t mll_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id) noexcept {
    return guarded<size_t>(0, [&] { return llama_state_seq_get_data(ctx, dst, size, seq_id); });
}

size_t mll_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size,
                              llama_seq_id dest_seq_id) noexcept {
    return guarded<size_t>(0, [&] { return llama_state_seq_set_data(ctx, src, size, dest_seq_id); });
}

}  // extern "C"
