"""File operations: open, encrypt, decrypt, rewrap and inspect CryptoTensors files and model directories."""
