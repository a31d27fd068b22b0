"""A resumable on-disk store of synthetic outliers (SHIFT, SynOOD).

Layout of a store directory::

    store.json          the generation config, written once at creation (atomically)
    manifest.jsonl      one JSON line per committed shard: its file name, sha256, records
    shards/shard-000000.npz, ...   uint8 images [n, C, H, W] of one shard each
    .lock               flock target; the OS releases it when the writer dies

Crash safety (a synthesis run may be killed at any instant and re-run):

* a shard's images are written to a temporary file, fsync'ed, then renamed into ``shards/``;
* only then is its manifest line appended (one ``write`` + fsync). The manifest line is the
  commit: a shard file without a manifest line is ignored by readers and deleted by the next
  writer; a torn last manifest line (no trailing newline or invalid JSON) is ignored and
  truncated by the next writer; a shard whose bytes do not match the recorded sha256 fails
  loudly on ``load``;
* every record carries its key ``(source_index, k)``; ``add_shard`` refuses keys already in the
  store, so a resumed run that asks :meth:`OutlierStore.done_keys` first produces every outlier
  exactly once.

Writers hold an exclusive ``flock`` on ``.lock`` for the duration of :meth:`OutlierStore.writer`
(or of one ``add_shard`` call), so two processes cannot interleave commits; the lock dies with
its process, so a ``SIGKILL`` never leaves a stale lock behind.

Sources that produce no outlier on purpose (e.g. a mask covering < 2 % of the image, as the
SHIFT reference code skips) are committed as *skipped* entries: they count as done for
resumption but are not images.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.base import ArrayDataset

FORMAT = "oodforge-outlier-store/1"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.npz$")
_REQUIRED = ("source_index", "k", "seed", "label")


class StoreError(RuntimeError):
    """A store on disk is unusable (config mismatch, corruption, duplicate outliers)."""


def _canon(obj) -> object:
    """JSON round trip, so tuples/np scalars compare equal to what was saved."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete: temp file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, prefix + key + ".")
        elif va != vb:
            out.append(f"{prefix}{key}: stored {va!r} != requested {vb!r}")
    return out


def outlier_seed(seed: int, source_index: int, k: int) -> int:
    """The seed of outlier ``k`` of source image ``source_index``, for every forger (31-bit, from NumPy's
    SeedSequence): independent of batching, sharding, ``--limit`` and resumption."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(source_index), int(k)])
    return int(ss.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def shard_indices(n: int, spec: str | None = None) -> np.ndarray:
    """The positions ``0..n-1`` that work shard ``spec`` = ``"i/m"`` owns (``i`` is 0-based, ``0 <= i < m``).

    Deterministic and disjoint: shard ``i`` takes every ``m``-th position starting at ``i``, so the
    ``m`` shards cover every position exactly once and get equal shares (±1) of the work.
    ``spec=None`` (or ``"0/1"``) returns all positions.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if spec is None:
        return np.arange(n, dtype=np.int64)
    i, m = parse_shard_spec(spec)
    return np.arange(i, n, m, dtype=np.int64)


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """``"i/m"`` -> ``(i, m)``, validated (0-based ``i``)."""
    m_ = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m_:
        raise ValueError(f"--shard must look like 'i/m' (e.g. 0/4 ... 3/4), got {spec!r}")
    i, m = int(m_.group(1)), int(m_.group(2))
    if m < 1 or not 0 <= i < m:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < m (shards are numbered from 0), got i={i}, m={m}")
    return i, m


def _read_config(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); the store is damaged: re-create it with the command "
                         "that made it (in a new --out folder)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise StoreError(f"{path} has no 'config' object; it is not an oodforge outlier store file")
    return meta


class OutlierStore:
    """Synthetic outliers on disk: image shards plus a manifest, written atomically (see module doc).

    ``OutlierStore(root, config)`` creates the store (saving ``config`` to ``store.json``) or reopens
    it; reopening with a different config raises :class:`StoreError` listing the differences, so a
    resumed run can never mix outliers made with different settings. ``config=None`` opens an
    existing store read-only-style without checking (for loading).

    Every record is a JSON-able dict with at least ``source_index``, ``k``, ``seed`` and ``label``;
    ``(source_index, k)`` is its key and is unique in the store.
    """

    def __init__(self, root: str | os.PathLike, config: dict | None = None) -> None:
        self.root = Path(root)
        cfg_path = self.root / "store.json"
        if config is None:
            if not cfg_path.is_file():
                raise FileNotFoundError(f"{self.root} is not an outlier store (no store.json); create it with "
                                        "`oodforge synth shift --out DIR` or OutlierStore(root, config)")
            meta = _read_config(cfg_path)
        else:
            config = _canon(config)
            if cfg_path.is_file():
                meta = _read_config(cfg_path)
                if meta.get("config") != config:
                    diff = _diff_keys(meta.get("config", {}), config)
                    raise StoreError(
                        f"the outlier store {self.root} was made with a different configuration:\n  "
                        + "\n  ".join(diff[:20])
                        + "\nUse another --out directory, or delete this one to start over."
                    )
            else:
                if self.root.exists() and not self.root.is_dir():
                    raise StoreError(f"{self.root} exists and is not a directory")
                self.root.mkdir(parents=True, exist_ok=True)
                stray = [p.name for p in self.root.iterdir() if not p.name.startswith(".")]
                if stray:
                    raise StoreError(f"{self.root} is not empty and has no store.json (found {stray[:5]}); "
                                     "choose an empty or new --out directory")
                meta = {"format": FORMAT, "config": config}
                _atomic_write_bytes(cfg_path, json.dumps(meta, indent=2, sort_keys=True).encode())
        if meta.get("format") != FORMAT:
            raise StoreError(f"{cfg_path}: unknown store format {meta.get('format')!r} (expected {FORMAT!r})")
        self.config: dict = meta["config"]
        (self.root / "shards").mkdir(exist_ok=True)
        self._lock_depth = 0
        self._lock_fd: int | None = None

    # --- paths ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    # --- locking & repair -------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, blocking: bool = False) -> Iterator[OutlierStore]:
        """Hold the store's exclusive write lock (re-entrant) and repair leftovers of a killed writer.

        With ``blocking=False`` a second live writer fails at once with a clear error instead of waiting.
        """
        if self._lock_depth == 0:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"another process is writing to the outlier store {self.root}; "
                                 "wait for it to finish or use another --out directory") from None
            self._lock_fd = fd
            try:
                self._repair()
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                self._lock_fd = None
                raise
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def _read_manifest(self) -> tuple[list[dict], int]:
        """Committed manifest entries and the byte length of the valid prefix of the file.

        The manifest is append-only, so the parsed prefix is cached and only new bytes are read.
        """
        try:
            st = os.stat(self.manifest_path)
        except FileNotFoundError:
            self._cache = (None, 0, [], set())
            return [], 0
        ino, off, entries, keys = getattr(self, "_cache", (None, 0, [], set()))
        if ino != st.st_ino or st.st_size < off:
            off, entries, keys = 0, [], set()
        entries, keys = list(entries), set(keys)
        with open(self.manifest_path, "rb") as f:
            f.seek(off)
            data = f.read()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn last line: not committed
            try:
                entry = json.loads(data[pos:nl])
            except json.JSONDecodeError:
                break
            if not isinstance(entry, dict) or "shard" not in entry or "records" not in entry:
                break
            entries.append(entry)
            keys.update((int(r["source_index"]), int(r["k"])) for r in entry["records"] + entry.get("skipped", []))
            pos = nl + 1
        self._cache = (st.st_ino, off + pos, entries, keys)
        return list(entries), off + pos

    def _repair(self) -> None:
        """Undo what a killed writer left: a torn manifest tail, uncommitted shard and temp files."""
        entries, valid = self._read_manifest()
        if self.manifest_path.is_file() and self.manifest_path.stat().st_size != valid:
            with open(self.manifest_path, "r+b") as f:
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        committed = {e["shard"] for e in entries if e["shard"]}
        for d in (self.root, self.shard_dir):
            for p in d.iterdir():
                if p.name.endswith(".tmp") and p.name.startswith("."):
                    p.unlink(missing_ok=True)
        for p in self.shard_dir.iterdir():
            if _SHARD_RE.match(p.name) and p.name not in committed:
                p.unlink(missing_ok=True)

    # --- reading -------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """The committed manifest entries (one per shard), in commit order."""
        return self._read_manifest()[0]

    def records(self) -> list[dict]:
        """All outlier records, sorted by ``(source_index, k)``; each also names its ``shard`` and ``row``."""
        out = []
        for e in self.entries():
            for row, r in enumerate(e["records"]):
                out.append({**r, "shard": e["shard"], "row": row})
        out.sort(key=lambda r: (r["source_index"], r["k"]))
        return out

    def skipped(self) -> list[dict]:
        """Sources committed without an image (e.g. mask coverage below the minimum), with their reason."""
        out = [s for e in self.entries() for s in e.get("skipped", [])]
        out.sort(key=lambda r: (r["source_index"], r["k"]))
        return out

    def done_keys(self) -> set[tuple[int, int]]:
        """Keys ``(source_index, k)`` already committed (outliers and deliberate skips): do not redo these."""
        self._read_manifest()
        return set(self._cache[3])

    def __len__(self) -> int:
        return sum(len(e["records"]) for e in self.entries())

    def _read_shard(self, entry: dict) -> np.ndarray:
        path = self.shard_dir / entry["shard"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path} is listed in {self.manifest_path} but missing; the store is damaged "
                             "(was a file deleted by hand?)") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{path} does not match its checksum in the manifest; the file is corrupt. "
                             "Delete its line from manifest.jsonl and re-run the synthesis command to redo it.")
        with np.load(io.BytesIO(data)) as z:
            return z["images"]

    def load(self, with_records: bool = False) -> ArrayDataset | tuple[ArrayDataset, list[dict]]:
        """All outliers as one :class:`ArrayDataset`, ordered by ``(source_index, k)``.

        Labels are the *source* image's class (useful for per-class analysis; the outliers are OOD);
        the attributes ``source_index`` and ``k`` (int64 arrays) say which ID image each came from, and
        ``store_config`` is the store's config (the forger that made them).
        The identity is derived from the manifest checksums, so feature caches follow the content.
        """
        entries = self.entries()
        imgs, recs = [], []
        for e in entries:
            if not e["records"]:
                continue
            im = self._read_shard(e)
            if im.shape[0] != len(e["records"]):
                raise StoreError(f"{e['shard']}: {im.shape[0]} images but {len(e['records'])} records")
            imgs.append(im)
            recs += [{**r, "shard": e["shard"], "row": i} for i, r in enumerate(e["records"])]
        if not imgs:
            shape = tuple(self.config.get("image_shape", (1, 1, 1)))
            images = np.zeros((0, *shape), dtype=np.uint8)
        else:
            images = np.concatenate(imgs)
        order = sorted(range(len(recs)), key=lambda i: (recs[i]["source_index"], recs[i]["k"]))
        images = images[order] if len(order) else images
        recs = [recs[i] for i in order]
        labels = np.array([r["label"] for r in recs], dtype=np.int64)
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for e in sorted(entries, key=lambda e: e["sha256"]):
            h.update(e["sha256"].encode())
        ds = ArrayDataset(images, labels, self.config.get("class_names"), identity=f"outliers:{h.hexdigest()[:24]}")
        # which ID image each outlier came from (e.g. for grids of ID images next to their outliers)
        ds.source_index = np.array([r["source_index"] for r in recs], dtype=np.int64)
        ds.k = np.array([r["k"] for r in recs], dtype=np.int64)
        # how they were forged (e.g. the masker and inpainter of a SHIFT store): result keys name it
        # (oodforge.keys.outlier_source)
        ds.store_config = dict(self.config)
        return (ds, recs) if with_records else ds

    # --- writing -------------------------------------------------------------------------------
    def add_shard(self, images: np.ndarray, records: list[dict], skipped: list[dict] | None = None) -> str | None:
        """Commit one shard atomically: ``images`` uint8 ``[n, C, H, W]`` with ``n`` ``records`` (same order).

        ``skipped`` lists keys committed without an image (each a dict with ``source_index``, ``k`` and
        a ``reason``). Raises :class:`StoreError` when a key is already in the store (or repeated), so an
        outlier can never be stored twice. Returns the shard file name (``None`` for an images-free shard).
        """
        images = np.asarray(images)
        skipped = [_canon(s) for s in (skipped or [])]
        records = [_canon(r) for r in records]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"add_shard expects uint8 images [n, C, H, W], got {images.dtype} {images.shape}")
        if images.shape[0] != len(records):
            raise ValueError(f"add_shard: {images.shape[0]} images but {len(records)} records")
        shape = self.config.get("image_shape")
        if shape is not None and len(records) and list(images.shape[1:]) != list(shape):
            raise ValueError(f"add_shard: images are {tuple(images.shape[1:])}, the store holds {tuple(shape)}")
        for r in records:
            missing = [f for f in _REQUIRED if f not in r]
            if missing:
                raise ValueError(f"add_shard: record {r} lacks {missing}")
        for s in skipped:
            if "source_index" not in s or "k" not in s:
                raise ValueError(f"add_shard: skipped entry {s} needs source_index and k")
        if not records and not skipped:
            return None
        new_keys = [(int(r["source_index"]), int(r["k"])) for r in records + skipped]
        if len(set(new_keys)) != len(new_keys):
            raise StoreError("add_shard: the same (source_index, k) appears twice in one shard")
        with self.writer(blocking=True):
            dup = self.done_keys().intersection(new_keys)
            if dup:
                raise StoreError(f"add_shard: {len(dup)} outliers are already in {self.root}, e.g. "
                                 f"(source_index, k) = {sorted(dup)[0]}; ask done_keys() before generating")
            name = None
            digest = None
            if records:
                name = self._next_shard_name()
                buf = io.BytesIO()
                np.savez(buf, images=np.ascontiguousarray(images))
                data = buf.getvalue()
                digest = hashlib.sha256(data).hexdigest()
                _atomic_write_bytes(self.shard_dir / name, data)
            entry = {"shard": name, "sha256": digest, "n": len(records), "records": records, "skipped": skipped}
            line = json.dumps(entry, sort_keys=True, default=_json_default) + "\n"
            with open(self.manifest_path, "ab") as f:
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.root)
            return name

    def _next_shard_name(self) -> str:
        used = [int(m.group(1)) for p in self.shard_dir.iterdir() if (m := _SHARD_RE.match(p.name))]
        used += [int(_SHARD_RE.match(e["shard"]).group(1)) for e in self.entries() if e["shard"]]
        return f"shard-{(max(used) + 1) if used else 0:06d}.npz"

    def __repr__(self) -> str:
        return f"OutlierStore({str(self.root)!r}, n={len(self)})"


def merge_stores(roots: Iterable[str | os.PathLike], out: str | os.PathLike, allow_partial: bool = False,
                 progress: bool = False) -> OutlierStore:
    """Merge the stores of work shards (``--shard i/m`` runs) into one store at ``out``.

    The stores must share their config except for the ``shard`` entry; the merged config has
    ``shard = None``, i.e. it equals the config of an unsharded run, and the merged store's
    ``load()`` equals the unsharded one's. If the configs name shards ``i/m``, all ``m`` must be
    given (``allow_partial=True`` merges a subset). Keys must be disjoint. Re-running a merge into an
    existing ``out`` store resumes it (already merged shards are not copied again).
    """
    stores = [OutlierStore(r) for r in roots]
    if not stores:
        raise ValueError("merge: give at least one store directory")
    base = {k: v for k, v in stores[0].config.items() if k != "shard"}
    specs = []
    for s in stores:
        cfg = {k: v for k, v in s.config.items() if k != "shard"}
        if cfg != base:
            diff = _diff_keys(base, cfg)
            raise StoreError(f"cannot merge {s.root} with {stores[0].root}: different configurations:\n  "
                             + "\n  ".join(diff[:20]))
        specs.append(s.config.get("shard"))
    if all(sp is not None for sp in specs):
        parsed = [parse_shard_spec(sp) for sp in specs]
        ms = {m for _, m in parsed}
        if len(ms) != 1:
            raise StoreError(f"merge: the stores were split differently ({sorted(set(specs))})")
        m = ms.pop()
        have = sorted(i for i, _ in parsed)
        if len(have) != len(set(have)):
            raise StoreError(f"merge: the same shard is given twice ({specs})")
        if have != list(range(m)) and not allow_partial:
            missing = sorted(set(range(m)) - set(have))
            raise StoreError(f"merge: shards {[f'{i}/{m}' for i in missing]} are missing; "
                             "pass them too, or allow_partial=True (CLI: --allow-partial)")
    seen: dict[tuple[int, int], Path] = {}
    for s in stores:
        for key in s.done_keys():
            if key in seen:
                raise StoreError(f"merge: outlier {key} is in both {seen[key]} and {s.root}")
            seen[key] = s.root
    merged = OutlierStore(out, {**base, "shard": None})
    from ..progress import progress_bar

    with merged.writer():
        done = merged.done_keys()
        todo = [(s, e) for s in stores for e in s.entries()]
        for s, e in progress_bar(todo, desc="merge", unit="shard", disable=not progress):
            keys = {(int(r["source_index"]), int(r["k"])) for r in e["records"] + e.get("skipped", [])}
            if keys and keys <= done:
                continue
            if keys & done:
                raise StoreError(f"merge: {out} already holds part of shard {s.root / 'shards' / str(e['shard'])}; "
                                 "it was not made by this merge. Use a new output directory.")
            images = s._read_shard(e) if e["records"] else np.zeros((0, *base.get("image_shape", (1, 1, 1))),
                                                                     dtype=np.uint8)
            merged.add_shard(images, e["records"], e.get("skipped", []))
    return merged


__all__ = ["OutlierStore", "StoreError", "merge_stores", "shard_indices", "parse_shard_spec"]
