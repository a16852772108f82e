"""INL-LLM: the thin model layer on top of inl_kernels (SPEC §4)."""
