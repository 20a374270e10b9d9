"""keyprotect's library: keys, block-wise encryption, shards, loaders, models.

from pipeline import load_key, encrypt, decrypt
key = load_key("k.bin")
x_enc = encrypt(images, key)  # uint8 HWC / NHWC, numpy or torch (any device)
assert (decrypt(x_enc, key) == images).all()
"""

from pipeline.cipher.blockwise import TRANSFORMS, BlockOp, KeyMaterial, apply_op, decrypt, encrypt
from pipeline.cipher.keys import Key, KeyFileError, fingerprint, load_key, save_key

__version__ = "0.1.0"

__all__ = [
    "TRANSFORMS",
    "BlockOp",
    "Key",
    "KeyFileError",
    "KeyMaterial",
    "apply_op",
    "decrypt",
    "encrypt",
    "fingerprint",
    "load_key",
    "save_key",
]
