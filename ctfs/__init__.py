"""ctfs: a FUSE filesystem that serves encrypted CryptoTensors models as plain safetensors."""

__version__ = "0.1.0"
