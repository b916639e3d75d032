"""The expert store and everything that writes or reads weights: the on-disk format, conversion from HF
folders and GGUF files, quantization, the GGUF writer. Imports nothing else of hobbit."""
