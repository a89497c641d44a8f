"""ctfs: a FUSE filesystem that serves encrypted CryptoTensors models as plain safetensors.

The library's public API; the mount itself is `ctfs mount` (ctfs.daemon).

    keys = ctfs.load_keys(["keys.jwk"])           # the provider chain of docs/keys.md
    with ctfs.open("model.enc.safetensors", keys) as f:   # header, signer and key checked here
        print(f.decrypt_chunk("lm_head.weight", 0)[:16])
    ctfs.decrypt("model.enc.safetensors", "model.safetensors", keys)
    ctfs.verify(["model.enc.safetensors"], keys)  # every tag
    ctfs.encrypt("model.safetensors", "out.safetensors", enc_key, sign_key, ctfs.EncryptOptions())
"""

from ctfs.files.decrypt import decrypt_file as decrypt
from ctfs.files.encrypt import EncryptOptions
from ctfs.files.encrypt import encrypt_file as encrypt
from ctfs.files.encrypted import EncryptedFile as open  # noqa: A001 (named as safetensors names safe_open)
from ctfs.files.encrypted import verify_files as verify
from ctfs.keys.chain import build_chain as load_keys

__version__ = "0.1.0"
__all__ = ["EncryptOptions", "decrypt", "encrypt", "load_keys", "open", "verify"]
