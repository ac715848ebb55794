"""Finding the scans of a cohort: BIDS datasets (pybids), folders, text/CSV lists and files.

Every scan gets a BIDS place in the output tree: ``sub-X/[ses-Y/]anat/`` and a file prefix
(``sub-X_[ses-Y_]...``, the input's name without ``_T1w`` and its extension). BIDS inputs keep
their own entities; other inputs whose names do not start with ``sub-`` become
``sub-<id>`` with ``<id>`` the scan id reduced to letters and digits.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from volseg.errors import InputError
from volseg.io import IMAGE_EXTENSIONS, scan_id
from volseg.io.derivatives import entities

log = logging.getLogger("volseg")

LIST_EXTENSIONS = (".txt", ".csv", ".tsv", ".lst")
# In a plain folder, files whose names mark them as masks or derivatives are not scans.
NOT_A_SCAN = re.compile(r"(_mask|_dseg|_probseg|_label-|_desc-|brainmask)", re.IGNORECASE)
_BIDS_NAME = re.compile(r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?(?:_|$)")


@dataclass(frozen=True)
class Scan:
    """One input scan and where its outputs go."""

    path: str  # the input file (absolute)
    subject: str  # label, without "sub-"
    session: str | None  # label, without "ses-"
    prefix: str  # output file prefix, e.g. "sub-01_ses-1_run-1"
    origin: str = "file"  # "bids", "folder", "list" or "file"

    @property
    def rel_dir(self) -> Path:
        """Output folder relative to the derivatives root: ``sub-X/[ses-Y/]anat``."""
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else [])
        return Path(*parts, "anat")

    def __str__(self) -> str:  # run_batch and log lines show the input file
        return self.path


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_from_file(path: str | os.PathLike, origin: str = "file") -> Scan:
    """A scan for a non-BIDS file: entities from a ``sub-X[_ses-Y]`` name, else ``sub-<id>``."""
    path = os.path.abspath(str(path))
    sid = scan_id(path)
    m = _BIDS_NAME.match(sid)
    if m and entities(sid) is not None:  # a BIDS name volseg can build output names from
        return Scan(path, m.group(1), m.group(2), sid, origin)
    label = re.sub(r"[^A-Za-z0-9]", "", sid) or "unnamed"
    return Scan(path, label, None, f"sub-{label}", origin)


def is_bids_root(folder: Path) -> bool:
    return (folder / "dataset_description.json").is_file()


def scans_from_bids(root: Path, participants: tuple[str, ...] = ()) -> list[Scan]:
    """T1w scans of a BIDS dataset, read with pybids (``derivatives/`` is not indexed)."""
    try:
        from bids import BIDSLayout
    except ImportError as exc:  # a declared dependency; say so if the install is broken
        raise InputError(root, f"is a BIDS dataset but pybids cannot be imported ({exc}); "
                               "reinstall volseg") from None
    try:
        layout = BIDSLayout(str(root), validate=False)
    except Exception as exc:  # pybids raises several types for malformed datasets
        raise InputError(root, f"cannot be read as a BIDS dataset ({type(exc).__name__}: {exc})") from None
    query = dict(suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"], return_type="object")
    if participants:
        query["subject"] = list(participants)
    scans = []
    for f in layout.get(**query):
        ent = f.get_entities()
        if entities(scan_id(f.path)) is None:  # entities volseg does not know: name it like a plain file
            scans.append(scan_from_file(f.path, "bids"))
            continue
        scans.append(Scan(os.path.abspath(f.path), str(ent["subject"]),
                          str(ent["session"]) if ent.get("session") else None,
                          scan_id(f.path), "bids"))
    if not scans:
        who = f" for participant(s) {', '.join(participants)}" if participants else ""
        raise InputError(root, f"BIDS dataset has no anat/*_T1w.nii[.gz] scans{who}")
    return scans


def scans_from_folder(folder: Path) -> list[Scan]:
    """Image files directly inside ``folder``, without mask/derivative files."""
    names = sorted(n for n in os.listdir(folder) if is_image(n) and not n.startswith("."))
    skipped = [n for n in names if NOT_A_SCAN.search(n)]
    if skipped:
        log.info("%s: %d mask/derivative file(s) left out (e.g. %s)", folder, len(skipped), skipped[0])
    scans = [scan_from_file(folder / n, "folder") for n in names if not NOT_A_SCAN.search(n)]
    if not scans:
        raise InputError(folder, "no scans (.nii, .nii.gz, .mgz, .mgh) in this folder")
    return scans


def scans_from_list(list_file: Path) -> list[Scan]:
    """One path a line (``#`` comments), or a CSV/TSV whose ``path``/``image`` column (else the
    first) holds them; relative paths are taken from the list file's folder."""
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(list_file, f"cannot read the list of scans ({exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    delim = "\t" if list_file.suffix.lower() == ".tsv" else "," if list_file.suffix.lower() == ".csv" else None
    rows = list(csv.reader(lines, delimiter=delim)) if delim else [[ln.strip()] for ln in lines]
    col = 0
    if rows:
        header = [c.strip().lower() for c in rows[0]]
        named = [i for i, c in enumerate(header) if c in ("path", "image", "t1w", "file")]
        if named:
            col, rows = named[0], rows[1:]
    paths = [r[col].strip() for r in rows if len(r) > col and r[col].strip()]
    if not paths:
        raise InputError(list_file, "the list of scans is empty")
    return [scan_from_file(p if os.path.isabs(p) else list_file.parent / p, "list") for p in paths]


def discover(inputs: list[str | os.PathLike], participants: tuple[str, ...] = (),
             failures: list | None = None) -> list[Scan]:
    """All scans named by ``inputs``, sorted by output place; a missing file is kept as a scan
    (it fails with 'file not found' like any other bad input). ``failures``: a list that
    collects ``(input, message)`` for each input that yields no scans (an empty folder, an
    unreadable list) instead of raising, so that the other inputs still run."""
    labels = tuple(p[4:] if p.startswith("sub-") else p for p in participants)
    scans: list[Scan] = []
    for item in inputs:
        p = Path(item)
        try:
            if p.is_dir():
                scans += scans_from_bids(p, labels) if is_bids_root(p) else scans_from_folder(p)
            elif p.suffix.lower() in LIST_EXTENSIONS and p.is_file():
                scans += scans_from_list(p)
            else:
                scans.append(scan_from_file(p))
        except InputError as exc:
            if failures is None:
                raise
            failures.append((str(item), str(exc)))
    if labels:
        scans = [s for s in scans if s.subject in labels]
        if not scans:
            raise InputError(", ".join(map(str, inputs)),
                             f"no scans for participant(s) {', '.join(labels)}")
    return sorted(scans, key=lambda s: (str(s.rel_dir), s.prefix, s.path))


def split_duplicates(scans: list[Scan]) -> tuple[list[Scan], list[tuple[Scan, str]]]:
    """Scans with unique output prefixes, and (scan, error) for the later duplicates."""
    seen: dict[str, Scan] = {}
    keep, dup = [], []
    for s in scans:
        key = str(s.rel_dir / s.prefix)
        if key in seen:
            if seen[key].path == s.path:
                continue  # the same file given twice
            dup.append((s, f"{s.path}: its outputs ({s.prefix}) would overwrite those of "
                           f"{seen[key].path}; rename one"))
        else:
            seen[key] = s
            keep.append(s)
    return keep, dup
