"""Pure header logic of the CryptoTensors format: parsing, validation and the plaintext view."""
