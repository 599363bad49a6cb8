"""Checkpoint codecs that need no server: the lossless DELTA format.

See :mod:`trainer_ckpt.delta` for the on-disk format and its invariants, and
``python -m trainer_ckpt --help`` for the command line (``apply-delta``, ``inspect``,
``make-delta``).
"""

from trainer_ckpt.delta import (
    DELTA_BIN,
    DELTA_JSON,
    ENCODINGS,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    DeltaBlob,
    DeltaError,
    DeltaStats,
    Encoding,
    TensorDelta,
    apply_delta,
    apply_delta_to_dir,
    decode_delta,
    encode_delta,
    read_manifest,
    weights_sha256,
    write_delta,
    xor_zstd_baseline_size,
)

__all__ = [
    "DELTA_BIN",
    "DELTA_JSON",
    "ENCODINGS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "DeltaBlob",
    "DeltaError",
    "DeltaStats",
    "Encoding",
    "TensorDelta",
    "apply_delta",
    "apply_delta_to_dir",
    "decode_delta",
    "encode_delta",
    "read_manifest",
    "weights_sha256",
    "write_delta",
    "xor_zstd_baseline_size",
]
