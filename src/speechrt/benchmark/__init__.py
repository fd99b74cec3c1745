"""GPU benchmarks behind ``speechrt bench``. Nothing here loads a model or touches CUDA at import."""
