"""qspeech: low-bit quantization of self-supervised speech upstreams, measured on SUPERB tasks."""

__version__ = "0.1.0"
