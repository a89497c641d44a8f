"""Cryptographic primitives of the CryptoTensors format, thin over `cryptography`."""
