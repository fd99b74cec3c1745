"""GPU benchmarks behind ``speechrt bench``; nothing here loads a model or touches CUDA at
import."""
