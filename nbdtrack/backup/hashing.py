"""Cluster hashes: what verify and merge check images against.

New backups hash with BLAKE3 cut to 128 bits: ~6 GB/s on one core here, against ~1.8 GB/s
for the SHA-256-128 of earlier repositories (hashlib on the CPU's SHA extensions) and
~0.6 GB/s for the BLAKE2b-128 of the first ones; for an incremental backup hashing was the
largest single cost of its copy (27 of ~80 ms). It stays a cryptographic hash, so a signed
manifest could one day vouch for every cluster. The algorithm is stored with the hashes
(``ClusterHashes.algorithm``), so images hashed any of these ways verify and merge.

The copy hashes each cluster as it writes it, on the event loop's thread. A hashing thread
beside the copy was tried and measured slower on every backup (bench/README.md): it
fought the copy for the GIL and, on two cores beside the server, for the CPU.
"""

from __future__ import annotations

import hashlib

from blake3 import blake3

ZERO_HASH = "zero"  # the hash recorded for a zero cluster
HASH_ALGORITHM = "blake3-128"  # what new images are hashed with
SHA256_ALGORITHM = "sha256-128"  # what images were hashed with before BLAKE3
LEGACY_ALGORITHM = "blake2b-128"  # hashes stored before the algorithm was recorded


def _blake3_128(data: bytes | memoryview) -> str:
    return blake3(data).hexdigest(16)


def _sha256_128(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _blake2b_128(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


HASH_FUNCTIONS = {
    HASH_ALGORITHM: _blake3_128,
    SHA256_ALGORITHM: _sha256_128,
    LEGACY_ALGORITHM: _blake2b_128,
}


class UnknownHashAlgorithm(ValueError):
    """Hashes made with an algorithm this version does not know."""


class ClusterHashes(dict[str, str]):
    """Cluster index (as a string) -> hash of the cluster as one image holds it
    (``ZERO_HASH`` for a zero cluster), and the algorithm that made them."""

    def __init__(self, algorithm: str = HASH_ALGORITHM, *args: object, **kwargs: str) -> None:
        if algorithm not in HASH_FUNCTIONS:
            raise UnknownHashAlgorithm(f"unknown cluster hash algorithm {algorithm!r}")
        super().__init__(*args, **kwargs)
        self.algorithm = algorithm
        self.of = HASH_FUNCTIONS[algorithm]  # the hash of a cluster's data
