"""A make_shards run's configuration (``ShardConfig``: everything that decides the shards'
bytes, plus how to run), the decoder and encryption device it resolves to, its statistics and
its error."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline import paths
from pipeline.errors import ConfigError, KeyprotectError
from pipeline.offline.decode import DEFAULT_MAX_PIXELS
from pipeline.offline.sources import SPLITS

TAR_OVERHEAD = 3 * 512 + 3 * 512 + 256  # three headers, padding and the JSON, per sample


@dataclass
class BuildStats:
    """What a run did, for the summary line and the benchmark."""

    images: int = 0  # images made into samples by this run
    job_images: int = 0  # on rank 0: the same for every rank of the job together
    rejected: int = 0  # files this run could not decode (not counted in ``images``)
    shards: int = 0  # shards made by this run (not those a resume found finished)
    encrypt_seconds: float = 0.0  # wall-clock seconds the builder thread spent encrypting
    encrypt_cpu_seconds: float = 0.0  # CPU seconds spent encrypting, every thread and process
    seconds: float = 0.0  # wall-clock seconds of the whole run
    cpu_seconds: float = 0.0  # CPU seconds of the whole process, every thread, and its workers
    worker_cpu_seconds: float = 0.0  # of which the decoding processes' (PIL)
    # the split being built: when its first decoded batch reached the builder, and its size
    # (the rate after it leaves out start-up: a GPU decoder's CUDA context, a pool's start)
    first_batch_at: float | None = None
    first_batch_images: int = 0


class ShardBuildError(KeyprotectError, RuntimeError):
    """The run cannot go on (too many rejects, a mismatched existing output, ...)."""


@dataclass(frozen=True)
class ShardConfig:
    """Everything that decides the shards' bytes, plus how to run."""

    src: str
    out: str = paths.SHARDS
    splits: tuple[str, ...] = SPLITS
    size: int = 224
    per_class: int | None = None
    fraction: float | None = None
    seed: int = 0
    classes_file: str | None = None
    shard_size: str = "1000"  # samples, or bytes with a unit: "200MB"
    decoder: str = "auto"  # auto, dali, nvjpeg, pil: see choose_decoder
    device: str = "auto"
    # where encryption runs: "auto" (where the decoder left the images: the GPU after DALI's
    # GPU decoder, else the CPU), "cpu", "cuda[:N]" (e.g. PIL decoding, encryption on a GPU).
    # The bytes are the same on every device, so it is not one of the data options.
    encrypt_device: str = "auto"
    plain: bool = False
    max_reject_fraction: float = 0.01
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 64
    num_threads: int = 2
    overwrite: bool = False
    force_unlock: bool = False  # take over another run's lock on the output
    follow_symlinks: bool = False  # use symlinks that leave src (rejected otherwise)

    def data_options(self, decoder: str, device: str) -> dict:
        """The options that shape the shards' content (recorded; a rerun must match them):
        ``decoder`` and ``device`` are the ones that run (``choose_decoder``), never "auto"."""
        options = {
            "size": self.size,
            "per_class": self.per_class,
            "fraction": self.fraction,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "decoder": decoder,
            "decode_device": device,
            "plain": self.plain,
            "max_pixels": self.max_pixels,
        }
        if self.follow_symlinks:  # only then: outputs made without it keep their identity
            options["follow_symlinks"] = True
        return options


def samples_per_shard(shard_size: str, sample_bytes: int) -> int:
    """``"1000"`` -> 1000 samples; ``"200MB"`` -> as many samples as fit in 200 MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?i?[bB])?\s*", str(shard_size))
    if not match:
        raise ConfigError(
            f"--shard-size {shard_size!r} is neither a sample count (e.g. 1000) nor a size "
            "(e.g. 200MB, 1GB)"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if number < 1 or number != int(number):
            raise ConfigError(f"--shard-size {shard_size!r} must be a whole number of samples >= 1")
        return int(number)
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit[0].lower()]
    if "i" in unit.lower():
        scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit[0].lower()]
    return max(1, int(number * scale) // (sample_bytes + TAR_OVERHEAD))


DECODERS = ("auto", "dali", "nvjpeg", "pil")


def choose_decoder(
    decoder: str, device: str, made_with: tuple[str, str] | None = None
) -> tuple[str, str]:
    """The decoder that runs and where ("cpu" or "gpu"); both shape the bytes, so the manifest
    records them. ``auto``: the decoder the output was made with (``made_with``, from its
    manifest or an unfinished run's options) when it can run here, so that a rerun on another
    kind of machine resumes or confirms it instead of being refused for other options; else DALI
    on the GPU when DALI and CUDA are there, else nvJPEG when CUDA is there, else the CPU
    decoder (DALI's when installed, else PIL). Checked before any work."""
    if device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"--device {device!r} must be one of auto, cpu, gpu")
    if decoder not in DECODERS:
        raise ConfigError(f"--decoder {decoder!r} must be one of {', '.join(DECODERS)}")
    if decoder == "auto" and made_with is not None and _can_run(*made_with, device):
        return made_with
    if decoder == "pil":
        if device == "gpu":
            raise ConfigError(
                "--decoder pil decodes on the CPU; use --decoder dali or nvjpeg for --device gpu "
                "(or --encrypt-device cuda to encrypt on the GPU)"
            )
        return "pil", "cpu"
    cuda = device != "cpu" and _cuda_available()
    if decoder == "nvjpeg":
        if device == "cpu" or not cuda:
            raise ConfigError(
                "--decoder nvjpeg decodes on a CUDA GPU"
                + (" (--device cpu was given)" if device == "cpu" else " and none is here")
                + ": use --decoder auto, dali or pil"
            )
        return "nvjpeg", "gpu"
    if decoder == "dali":
        return "dali", device if device != "auto" else ("gpu" if cuda else "cpu")
    dali = _dali_available()
    if cuda or device == "gpu":
        return ("dali" if dali else "nvjpeg"), "gpu"
    return ("dali" if dali else "pil"), "cpu"


def _can_run(decoder: str, where: str, device: str) -> bool:
    """Whether ``decoder`` on ``where`` (an output's record) can run here under ``--device``."""
    if device not in ("auto", where) or (decoder, where) not in _DECODER_PLACES:
        return False
    if where == "gpu" and not _cuda_available():
        return False
    return decoder != "dali" or _dali_available()


_DECODER_PLACES = {("pil", "cpu"), ("dali", "cpu"), ("dali", "gpu"), ("nvjpeg", "gpu")}


def _cuda_available() -> bool:
    from pipeline.device import resolve_device as torch_device

    return torch_device("auto").type == "cuda"


def _dali_available() -> bool:
    from pipeline.offline.dali import DaliUnavailableError, _dali

    try:
        _dali()
    except DaliUnavailableError:
        return False
    return True


def encryption_device(encrypt_device: str, decoding_on: str, local_rank: int) -> str:
    """Where this rank encrypts: ``auto`` (where the decoder leaves the images: DALI's GPU
    output is on this rank's GPU), or ``--encrypt-device`` resolved for this rank (``cuda``
    means this rank's GPU: ``LOCAL_RANK``, shared when there are more ranks than GPUs, see
    ``rank_gpu``). The bytes are the same everywhere, so this is not recorded."""
    if decoding_on != "gpu" and encrypt_device == "auto":
        return "auto"  # no torch import: on the CPU paths it would add ~450 MB RSS
    import torch

    from pipeline.device import rank_gpu
    from pipeline.device import resolve_device as torch_device

    if decoding_on == "gpu":
        torch.cuda.set_device(rank_gpu(local_rank))  # DALI decodes there; torch's "cuda" too
    if encrypt_device == "auto":
        return "auto"
    gpu = rank_gpu(local_rank) if torch.cuda.is_available() else local_rank
    return str(torch_device(encrypt_device, local_rank=gpu))
