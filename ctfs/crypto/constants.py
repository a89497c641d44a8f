"""Sizes fixed by the AEADs the format uses: key lengths per algorithm, nonce and tag sizes, the chunk counter."""

# Key length in bytes of each AEAD, by the format's normalised algorithm name.
ENC_KEY_LENGTHS = {"aes128gcm": 16, "aes256gcm": 32, "chacha20poly1305": 32}
NONCE_SIZE = 12
TAG_SIZE = 16
# Chunk nonces carry a 32-bit big-endian counter in their last four bytes.
MAX_COUNTER = 0xFFFFFFFF
