"""The native layer: llama.cpp declarations, the nogil engine and its C helpers (Cython)."""
