"""The outlier store: atomic shards + manifest, resumption, sharding and merging."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oodforge.outliers.store import OutlierStore, StoreError, merge_stores, parse_shard_spec, shard_indices

CFG = {"method": "test", "image_shape": [1, 4, 4], "seed": 0, "shard": None, "class_names": ["a", "b"]}


def _batch(keys, shape=(1, 4, 4)):
    """Images whose pixels encode their key, so order and identity are checkable."""
    imgs = np.stack([np.full(shape, (7 * s + k) % 256, dtype=np.uint8) for s, k in keys])
    recs = [{"source_index": s, "k": k, "seed": 1000 * s + k, "label": s % 2, "coverage": 0.5} for s, k in keys]
    return imgs, recs


def test_roundtrip_sorted_and_done_keys(tmp_path):
    st = OutlierStore(tmp_path / "s", CFG)
    st.add_shard(*_batch([(3, 0), (3, 1), (0, 1)]))
    st.add_shard(*_batch([(0, 0), (1, 0)]), skipped=[{"source_index": 2, "k": 0, "reason": "coverage"}])
    assert st.done_keys() == {(3, 0), (3, 1), (0, 1), (0, 0), (1, 0), (2, 0)}
    ds, recs = OutlierStore(tmp_path / "s").load(with_records=True)
    keys = [(r["source_index"], r["k"]) for r in recs]
    assert keys == [(0, 0), (0, 1), (1, 0), (3, 0), (3, 1)]
    assert ds.images.shape == (5, 1, 4, 4)
    assert [int(ds.images[i, 0, 0, 0]) for i in range(5)] == [(7 * s + k) % 256 for s, k in keys]
    assert ds.labels.tolist() == [s % 2 for s, _ in keys]
    assert ds.class_names == ["a", "b"]
    assert [s["source_index"] for s in st.skipped()] == [2]
    assert len(st) == 5


def test_config_mismatch_and_duplicates_are_refused(tmp_path):
    st = OutlierStore(tmp_path / "s", CFG)
    st.add_shard(*_batch([(0, 0)]))
    with pytest.raises(StoreError, match="seed"):
        OutlierStore(tmp_path / "s", {**CFG, "seed": 1})
    with pytest.raises(StoreError, match="already"):
        st.add_shard(*_batch([(1, 0), (0, 0)]))
    with pytest.raises(StoreError, match="twice"):
        st.add_shard(*_batch([(5, 0), (5, 0)]))
    with pytest.raises(ValueError, match="lacks"):
        st.add_shard(np.zeros((1, 1, 4, 4), np.uint8), [{"source_index": 9, "k": 0}])
    with pytest.raises(ValueError, match="holds"):
        st.add_shard(np.zeros((1, 1, 5, 5), np.uint8), _batch([(9, 0)])[1])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        OutlierStore(tmp_path / "junk", CFG)
    assert st.done_keys() == {(0, 0)}


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    st = OutlierStore(tmp_path / "s", CFG)
    st.add_shard(*_batch([(0, 0), (1, 0)]))
    # a kill after the shard file landed but before its manifest line: an orphan shard
    orphan = st.shard_dir / "shard-000007.npz"
    np.savez(orphan, images=np.zeros((1, 1, 4, 4), np.uint8))
    # a kill while writing a temp file, and a torn manifest line
    (st.shard_dir / ".shard-000008.npz.abc.tmp").write_bytes(b"partial")
    torn = json.dumps({"shard": "shard-000007.npz", "sha256": "x", "n": 1,
                       "records": [{"source_index": 9, "k": 0, "seed": 0, "label": 0}]})[:-10]
    with open(st.manifest_path, "ab") as f:
        f.write(torn.encode())
    reader = OutlierStore(tmp_path / "s")
    assert reader.done_keys() == {(0, 0), (1, 0)}
    assert len(reader.load()) == 2
    # the next writer repairs: the torn tail, the orphan and the temp file go, new commits parse
    st2 = OutlierStore(tmp_path / "s", CFG)
    st2.add_shard(*_batch([(9, 0)]))
    assert not orphan.exists() or orphan.name in {e["shard"] for e in st2.entries()}
    assert not list(st.shard_dir.glob("*.tmp"))
    assert st2.done_keys() == {(0, 0), (1, 0), (9, 0)}
    lines = st2.manifest_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)
    ds = OutlierStore(tmp_path / "s").load()
    assert len(ds) == 3 and int(ds.images[2, 0, 0, 0]) == 63


def test_corrupt_shard_fails_loudly(tmp_path):
    st = OutlierStore(tmp_path / "s", CFG)
    name = st.add_shard(*_batch([(0, 0)]))
    p = st.shard_dir / name
    p.write_bytes(p.read_bytes()[:-5] + b"XXXXX")
    with pytest.raises(StoreError, match="checksum"):
        st.load()


def test_second_live_writer_is_refused(tmp_path):
    a = OutlierStore(tmp_path / "s", CFG)
    b = OutlierStore(tmp_path / "s", CFG)
    with a.writer():
        with pytest.raises(StoreError, match="another process"):
            with b.writer():
                pass
    with b.writer():  # released
        b.add_shard(*_batch([(0, 0)]))


@pytest.mark.parametrize("n,m", [(0, 3), (1, 1), (10, 3), (11, 4), (5, 7)])
def test_shard_indices_partition(n, m):
    parts = [shard_indices(n, f"{i}/{m}") for i in range(m)]
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(n))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert np.array_equal(shard_indices(n, f"1/{m}") if m > 1 else parts[0], parts[1 if m > 1 else 0])
    assert np.array_equal(shard_indices(n), np.arange(n))


@pytest.mark.parametrize("bad", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_spec(bad):
    with pytest.raises(ValueError, match="shard"):
        parse_shard_spec(bad)


def test_merge_equals_unsharded(tmp_path):
    keys = [(s, k) for s in range(7) for k in range(2)]
    full = OutlierStore(tmp_path / "full", CFG)
    full.add_shard(*_batch(keys))
    roots = []
    for i in range(3):
        st = OutlierStore(tmp_path / f"p{i}", {**CFG, "shard": f"{i}/3"})
        mine = [key for key in keys if key[0] in set(shard_indices(7, f"{i}/3").tolist())]
        st.add_shard(*_batch(mine[:2]))
        if mine[2:]:
            st.add_shard(*_batch(mine[2:]))
        roots.append(st.root)
    with pytest.raises(StoreError, match="missing"):
        merge_stores(roots[:2], tmp_path / "bad")
    merged = merge_stores(roots, tmp_path / "merged")
    assert merged.config == full.config
    a, ra = merged.load(with_records=True)
    b, rb = full.load(with_records=True)
    assert np.array_equal(a.images.numpy(), b.images.numpy())
    strip = [{k: v for k, v in r.items() if k not in ("shard", "row")} for r in ra]
    assert strip == [{k: v for k, v in r.items() if k not in ("shard", "row")} for r in rb]
    # re-running the merge is a no-op (resumable), a conflicting store is refused
    merge_stores(roots, tmp_path / "merged")
    assert len(OutlierStore(tmp_path / "merged")) == len(keys)
    with pytest.raises(StoreError, match="twice"):
        merge_stores([roots[0], roots[0], roots[1], roots[2]], tmp_path / "m2")
    dup = OutlierStore(tmp_path / "dup", CFG)  # an unsharded store overlapping shard 0
    dup.add_shard(*_batch([(0, 0)]))
    with pytest.raises(StoreError, match="both"):
        merge_stores([roots[0], dup.root], tmp_path / "m2")
    other = OutlierStore(tmp_path / "other", {**CFG, "seed": 5, "shard": "1/3"})
    with pytest.raises(StoreError, match="different"):
        merge_stores([roots[0], other.root], tmp_path / "m3", allow_partial=True)
