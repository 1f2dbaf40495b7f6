"""Merge the oldest backups of a chain into its full: a synthetic full, a shorter chain.

For each full F, the *spine* is the lineage of the newest backup descending from F
(F, B1, ..., Bm). ``keep=N`` folds F, B1, ..., Bk (k = m - N) into one standalone image
that replaces the file of Bk, so Bk+1's backing-file name stays valid and Bk keeps its id
(it becomes mode "full"); F .. Bk-1 disappear as restore points. A backup outside the
spine whose parent is folded away (typically a differential based on F) is rewritten onto
Bk: it keeps its id and its contents, and gains the clusters B(parent+1) .. Bk changed,
holding their old contents, so it restores byte for byte as before.

Crash safety. At every instant the manifest names files that restore correctly:

1. The new images are written to ``*.merge-tmp`` files and synced. The merged image holds
   every cluster any folded image holds (data, or a zero cluster where the content is
   zero), so it reads the same whether restored alone or, as the old manifest says, on
   top of the folded images; a rewritten backup reads the same over the old chain and
   over the merged image.
2. A journal (``merge-journal.json``) records the renames, the manifest changes and the
   files to delete, then is synced: from here on the merge is rolled forward.
3. The temp files are renamed over their final names (each rename is atomic, and by 1.
   both old and new manifest restore correctly across it); the directory is synced.
4. The manifest changes are applied to the manifest as it is then, atomically.
5. The folded files are deleted, then the journal.

A crash before 2 leaves temp files the next merge deletes; after 2, the next merge (and
verify tells so) finishes the journal first. Contents are checked against the manifest's
hashes while they are copied, so a damaged image is refused, never laundered into a
merged image with fresh hashes. Do not run a merge and a backup of the same export at
the same time: both rewrite the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from bitarray import bitarray

from nbdtrack.backup.hashing import ZERO_HASH, ClusterHashes
from nbdtrack.backup.progress import Progress
from nbdtrack.backup.qcow2 import Qcow2Error, Qcow2Writer
from nbdtrack.backup.repository import (
    HASHES_SUFFIX,
    BackupRecord,
    Chain,
    Repository,
    RepositoryError,
    fsync_directory,
    write_atomically,
    write_hashes,
)
from nbdtrack.backup.restore import (
    CHUNK,
    UNALLOCATED,
    ChainView,
    RestoreError,
    open_image,
    select_chain,
)
from nbdtrack.backup.zeros import is_zero

JOURNAL = "merge-journal.json"
TMP_SUFFIX = ".merge-tmp"


class MergeError(Exception):
    """The merge cannot be done; the message says why, in one line."""


@dataclass
class MergeStep:
    """One full's part of a merge."""

    full: str  # id of the full the spine starts from
    target: str  # id of the backup that becomes the new full
    folded: list[str]  # ids removed from the manifest (their files deleted)
    rebased: list[str] = field(default_factory=list)  # ids rewritten onto ``target``

    def describe(self) -> str:
        text = f"merged {', '.join(self.folded)} into {self.target} (now a full backup)"
        if self.rebased:
            text += f"; rewrote {', '.join(self.rebased)} onto it"
        return text


def plan_merge(chain: Chain, keep: int) -> list[MergeStep]:
    """What ``merge --keep`` would do to ``chain``, full by full, oldest first."""
    if keep < 0:
        raise MergeError(f"--keep must be 0 or more, not {keep}")
    roots: dict[str, str] = {}
    for record in chain.backups:
        roots[record.id] = chain.lineage(record.id)[0].id
    steps = []
    for full in chain.backups:
        if full.mode != "full" or full.parent is not None:
            continue
        tree = [b for b in chain.backups if roots[b.id] == full.id]
        spine = chain.lineage(tree[-1].id)
        k = len(spine) - 1 - keep
        if k <= 0:
            continue
        folded = {b.id for b in spine[:k]}
        inside = folded | {spine[k].id}
        rebased = [b.id for b in tree if b.parent in folded and b.id not in inside]
        steps.append(MergeStep(full.id, spine[k].id, [b.id for b in spine[:k]], rebased))
    return steps


def merge(
    root: str,
    *,
    export: str | None = None,
    keep: int = 0,
    progress: Progress | None = None,
    dry_run: bool = False,
) -> list[MergeStep]:
    """Fold the oldest backups of the chain(s) so that at most ``keep`` remain after
    each full; returns what was done."""
    progress = progress or Progress()
    chain = select_chain(root, export)
    with chain.locked():
        if recover(chain.path, progress):
            chain = Repository(root).chain(chain.export)
        _remove_temp_files(chain.path)
        steps = plan_merge(chain, keep)
        if dry_run:
            return steps
        for step in steps:
            try:
                _merge_step(chain, step, progress)
            except (RestoreError, Qcow2Error) as err:
                raise MergeError(str(err)) from None
            chain = Repository(root).chain(chain.export)
    return steps


def _remove_temp_files(path: str) -> None:
    for name in os.listdir(path):
        if name.endswith(TMP_SUFFIX):
            os.unlink(os.path.join(path, name))


def _merge_step(chain: Chain, step: MergeStep, progress: Progress) -> None:
    target = chain.get(step.target)
    spine = chain.lineage(target.id)
    position = {b.id: n for n, b in enumerate(spine)}
    sizes = {b.export_size for b in spine} | {chain.get(i).export_size for i in step.rebased}
    if len(sizes) > 1:
        raise MergeError(f"the export size changes inside the chain of '{chain.export}'")
    renames: list[tuple[str, str]] = []
    updates: dict[str, dict] = {}
    try:
        # The merged image: every cluster any folded image holds.
        with ChainView(chain, spine) as view:
            held = bitarray(len(view.owner))
            held.setall(0)
            for index, who in enumerate(view.owner):
                if who != UNALLOCATED:
                    held[index] = 1
            written = _write(chain, view, held, target, None, progress)
        renames += _renames(target.file)
        updates[target.id] = {"mode": "full", "parent": None, "bytes_written": written}
        # Backups whose parent is folded away: add what the spine changed after it.
        for backup_id in step.rebased:
            record = chain.get(backup_id)
            parent_at = position[record.parent]
            with ChainView(chain, chain.lineage(record.id)) as view:
                held = bitarray(len(view.owner))
                held.setall(0)
                for cluster in view.readers[-1].allocation():
                    held[cluster.index] = 1
                for later in spine[parent_at + 1 :]:
                    with open_image(chain.image_path(later)) as reader:
                        for cluster in reader.allocation():
                            held[cluster.index] = 1
                written = _write(chain, view, held, record, target.file, progress)
            renames += _renames(record.file)
            updates[record.id] = {"parent": target.id, "bytes_written": written}
    except BaseException:
        _remove_temp_files(chain.path)
        raise
    journal = {
        "export": chain.export,
        "renames": renames,
        "updates": updates,
        "remove": step.folded,
        "delete": [
            name
            for i in step.folded
            for name in (chain.get(i).file, chain.get(i).file + HASHES_SUFFIX)
        ],
    }
    write_atomically(os.path.join(chain.path, JOURNAL), json.dumps(journal, indent=1).encode())
    _finish(chain.path)


def _write(
    chain: Chain,
    view: ChainView,
    held: bitarray,
    record: BackupRecord,
    backing: str | None,
    progress: Progress,
) -> int:
    """Write the ``held`` clusters of ``view`` into ``record.file + TMP_SUFFIX``, data as
    data and zeros as zero clusters, and their hashes beside it; returns the data bytes
    written. Every cluster read is checked against the hash recorded for its image."""
    cs = view.cluster_size
    size = view.virtual_size
    path = chain.image_path(record) + TMP_SUFFIX
    total = sum(1 for i in held.search(1) if view.owner[i] >= 0) * cs
    progress.start(f"merge {record.id}", total)
    writer = Qcow2Writer.create(path, size, cluster_size=cs, backing_file=backing)
    hashes = ClusterHashes()
    written = 0
    try:
        step = max(1, CHUNK // cs)
        pos = held.find(1)
        while pos >= 0:
            end = held.find(0, pos)
            end = len(held) if end < 0 else end
            index = pos
            while index < end:
                who = view.owner[index]
                stop = index + 1
                while stop < end and stop - index < step and view.owner[stop] == who:
                    stop += 1
                offset = index * cs
                length = min(stop * cs, size) - offset
                if who < 0:
                    writer.write_zeroes(offset, length)
                    for i in range(index, stop):
                        hashes[str(i)] = ZERO_HASH
                else:
                    source = view.records[who]
                    recorded = chain.hashes(source)
                    same = recorded.algorithm == hashes.algorithm  # else hash anew
                    data = memoryview(view.readers[who].read(offset, length))
                    for i in range(index, stop):
                        piece = data[(i - index) * cs : (i - index + 1) * cs]
                        expected = recorded.get(str(i))
                        if expected == ZERO_HASH or recorded.of(piece) != expected:
                            raise MergeError(
                                f"{chain.image_path(source)}: cluster {i} does not match "
                                f"the manifest; run 'nbdtrack verify' (nothing was changed)"
                            )
                        if is_zero(piece):
                            writer.write_zeroes(i * cs, len(piece))
                            hashes[str(i)] = ZERO_HASH
                        else:
                            writer.write(i * cs, piece)
                            hashes[str(i)] = expected if same else hashes.of(piece)
                            written += len(piece)
                    progress.advance(length)
                index = stop
            pos = held.find(1, end)
    except BaseException:
        writer.abort()
        progress.finish()
        raise
    writer.close()  # syncs the image
    write_hashes(chain.hashes_path(record.file) + TMP_SUFFIX, hashes)
    progress.finish()
    return written


def _renames(image_file: str) -> list[tuple[str, str]]:
    """A rewritten image and its hashes go from their temporary names into place."""
    hashes_file = image_file + HASHES_SUFFIX
    return [(image_file + TMP_SUFFIX, image_file), (hashes_file + TMP_SUFFIX, hashes_file)]


def recover(path: str, progress: Progress | None = None) -> bool:
    """Finish a merge that a crash interrupted after its journal; True if there was one."""
    if not os.path.exists(os.path.join(path, JOURNAL)):
        return False
    if progress is not None:
        progress.message("finishing an interrupted merge")
    _finish(path)
    return True


def _finish(path: str) -> None:
    """Roll the journal forward; every step is idempotent."""
    journal_path = os.path.join(path, JOURNAL)
    try:
        with open(journal_path, encoding="utf-8") as f:
            journal = json.load(f)
    except (OSError, ValueError) as err:
        raise MergeError(f"{journal_path}: cannot read the merge journal: {err}") from None
    for tmp, final in journal["renames"]:
        if os.path.exists(os.path.join(path, tmp)):
            os.replace(os.path.join(path, tmp), os.path.join(path, final))
    fsync_directory(path)
    chain = Chain.load(path, journal["export"])
    removed = set(journal["remove"])
    if any(b.id in removed for b in chain.backups) or any(
        _differs(chain, backup_id, fields) for backup_id, fields in journal["updates"].items()
    ):
        backups = []
        for record in chain.backups:
            if record.id in removed:
                continue
            fields = journal["updates"].get(record.id)
            if fields:
                record = BackupRecord(**{**asdict(record), **fields})
            backups.append(record)
        chain.backups = backups
        chain.save()
    for name in journal["delete"]:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    fsync_directory(path)
    os.unlink(journal_path)
    fsync_directory(path)


def _differs(chain: Chain, backup_id: str, fields: dict) -> bool:
    try:
        record = chain.get(backup_id)
    except RepositoryError:
        return False
    return any(getattr(record, k) != v for k, v in fields.items())
