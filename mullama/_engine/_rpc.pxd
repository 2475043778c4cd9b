# Declarations of ggml-rpc.h, ggml's RPC backend (built with MULLAMA_RPC=1).
# Pinned llama.cpp: commit 0c1e57098 (vendor/llama.cpp.pin). No logic here.
#
# The functions are reached through the "RPC" backend registry's proc-address
# table, as llama.cpp's own rpc-server does, so a build without the backend
# still links (the registry is then simply absent).

from mullama._engine._ggml_backend cimport ggml_backend_dev_t, ggml_backend_reg_t

cdef extern from "ggml-rpc.h" nogil:
    int GGML_RPC_MAX_SERVERS
    int RPC_PROTO_MAJOR_VERSION
    int RPC_PROTO_MINOR_VERSION
    int RPC_PROTO_PATCH_VERSION

# ggml_backend_rpc_add_server(endpoint): the registry of the devices one server exposes
ctypedef ggml_backend_reg_t (*rpc_add_server_fn)(const char * endpoint) noexcept nogil
# ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices, devices): serves forever
ctypedef void (*rpc_start_server_fn)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                     size_t n_devices, ggml_backend_dev_t * devices) noexcept nogil
