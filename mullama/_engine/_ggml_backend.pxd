# Declarations of the part of ggml-backend.h that mullama uses (devices and their registries).
# Pinned llama.cpp: commit 0c1e57098 (vendor/llama.cpp.pin). No logic here.

cdef extern from "ggml-backend.h" nogil:
    cdef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    cdef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t

    cdef enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL
        GGML_BACKEND_DEVICE_TYPE_META

    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    ggml_backend_dev_t ggml_backend_dev_by_type(ggml_backend_dev_type type)

    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)
    ggml_backend_reg_t ggml_backend_reg_by_name(const char * name)
