"""tools/absorb_key.py: a plain isotropic model's checkpoint -> the protected one, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from pipeline import encrypt
from pipeline.cipher.keys import Key, save_key
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.evaluation import load_model, predict
from tools.absorb_key import main

SECRET = bytes(range(32))


def plain_checkpoint(path, *, patch: int, model: str = "vit_tiny_patch16_224", **kwargs):
    """A random-init model's checkpoint with every field train/ddp.py writes for plain shards."""
    kwargs = {"img_size": 32, "patch_size": patch, "depth": 1, **kwargs} if model.startswith(
        "vit") else kwargs  # fmt: skip
    torch.manual_seed(patch)
    net = timm.create_model(model, num_classes=10, **kwargs)
    Checkpoint(
        model_name=model, classes=tuple(str(i) for i in range(10)), image_shape=(32, 32, 3),
        key_fingerprint=None, config={"model": model, "model_kwargs": kwargs, "crop_size": None},
        manifest_digests={"train": "x", "val": "y"}, model=net.state_dict(), epoch=1,
        global_step=10,
    ).save(path)  # fmt: skip
    return path


def images(n: int = 6, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("patch", "transforms"), [(8, ("shuffle", "np")), (16, ("np", "shuffle")), (8, ("np",))]
)
def test_absorbed_checkpoint_on_encrypted_images_is_the_plain_model(tmp_path, patch, transforms):
    plain = plain_checkpoint(tmp_path / "plain.pt", patch=patch)
    key = Key(SECRET, patch, transforms)
    key_file = save_key(key, tmp_path / "k.bin")
    out = tmp_path / "protected.pt"
    assert main(["--checkpoint", str(plain), "--key", str(key_file), "--out", str(out)]) == 0

    assert out.stat().st_mode & 0o777 == 0o600
    assert SECRET not in out.read_bytes()  # the fingerprint only, never the key
    saved = Checkpoint.load(out)  # weights_only, every field checked
    assert saved.key_fingerprint == key.fingerprint
    assert (saved.block_size, saved.transforms) == (patch, transforms)
    assert saved.optimizer == {} and saved.manifest_digests == {}
    assert len(saved.absorbed_from) == 64  # the plain weights' digest
    x = images()
    plain_model, _ = load_model(str(plain))
    protected, meta = load_model(str(out))
    want = predict(plain_model, x)
    np.testing.assert_allclose(predict(protected, encrypt(x, key)), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(predict(protected, x), want, atol=1e-2)  # plain images: not the model
    assert meta.absorbed_from == saved.absorbed_from


def test_refusals_name_the_reason_and_write_nothing(tmp_path, caplog):
    plain = plain_checkpoint(tmp_path / "plain.pt", patch=8)
    out = tmp_path / "out.pt"

    def absorb(key: Key, checkpoint=plain) -> str:
        key_file = save_key(key, tmp_path / f"refused-{len(caplog.records)}.bin", overwrite=True)
        caplog.clear()
        assert main(["--checkpoint", str(checkpoint), "--key", str(key_file), "--out",
                     str(out)]) == 2  # fmt: skip
        assert not out.exists()
        return caplog.text

    assert "FFX" in absorb(Key(SECRET, 8, ("shuffle", "np", "ffx")))
    assert "block size 4 is not the patch size 8" in absorb(Key(SECRET, 4, ("shuffle", "np")))
    assert "block size 16 is not the patch size 8" in absorb(Key(SECRET, 16, ("shuffle",)))
    cnn = plain_checkpoint(tmp_path / "cnn.pt", patch=8, model="test_efficientnet")
    assert "no patch embedding" in absorb(Key(SECRET, 8, ("shuffle",)), cnn)
    # an already protected model: absorbing again would stack two keys
    key = Key(SECRET, 8, ("shuffle",))
    key_file = save_key(key, tmp_path / "k8.bin")
    first = tmp_path / "first.pt"
    assert main(["--checkpoint", str(plain), "--key", str(key_file), "--out", str(first)]) == 0
    assert "already protected" in absorb(key, first)
    # and an existing output is kept unless --force
    out.write_bytes(b"keep")
    assert main(["--checkpoint", str(plain), "--key", str(key_file), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep"
    assert main(["--checkpoint", str(plain), "--key", str(key_file), "--out", str(out),
                 "--force"]) == 0  # fmt: skip
