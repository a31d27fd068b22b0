"""Outlier stores: the resumable, checksummed on-disk format every forger writes (SHIFT, SynOOD, refined
outliers) and every consumer reads (``bench --outliers``, ``train --method oe``). Shared infrastructure,
below the method packages (docs/architecture.md)."""

from .store import OutlierStore, StoreError, merge_stores, outlier_seed, parse_shard_spec, shard_indices

__all__ = ["OutlierStore", "StoreError", "merge_stores", "outlier_seed", "parse_shard_spec", "shard_indices"]
