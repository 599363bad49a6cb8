"""Checkpoint codecs that need no server: the lossless DELTA format.

See :mod:`trainer_ckpt.delta` for the on-disk format and its invariants, and
``python -m trainer_ckpt --help`` for the command line (``apply-delta``, ``inspect``,
``make-delta``). :func:`apply_delta_inplace` updates weights already in memory (a dict of
tensors or a loaded model) for serving replicas. Importing this package needs only torch,
numpy, safetensors and zstandard (no transformers).
"""

from trainer_ckpt.delta import (
    DELTA_BIN,
    DELTA_JSON,
    ENCODINGS,
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    WEIGHTS_FILE,
    DeltaBlob,
    DeltaError,
    DeltaStats,
    Encoding,
    Progress,
    TensorDelta,
    apply_delta,
    apply_delta_inplace,
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
    "READABLE_VERSIONS",
    "WEIGHTS_FILE",
    "DeltaBlob",
    "DeltaError",
    "DeltaStats",
    "Encoding",
    "Progress",
    "TensorDelta",
    "apply_delta",
    "apply_delta_inplace",
    "apply_delta_to_dir",
    "decode_delta",
    "encode_delta",
    "read_manifest",
    "weights_sha256",
    "write_delta",
    "xor_zstd_baseline_size",
]
