"""The one on-disk cache of lp: converted models, calibration statistics, selection scores, teacher logits.

Layout: `<root>/<kind>/<name>/` holds an entry's files plus `manifest.json` (cache format, the
entry's key, every file's size). Writing an entry (`fetch`):
  * under an exclusive lock (`<root>/.locks/<kind>.<name>.lock`, `fcntl.flock`), so that processes needing
    the same missing entry compute it once: the first builds, the others wait and then read it;
  * into a private temporary folder (`.<name>.tmp-<pid>-<random>`), files fsynced and given the
    umask's permissions (a group-shared cache stays readable by the group), then renamed into place;
  * leftover temporary folders of killed writers (no process holds their entry's lock) are removed.
Reading checks the manifest (format, key, every file present with its recorded size) and then the
caller's `load`; an incomplete or corrupt entry is logged as a warning, removed and rebuilt, never
used. An unwritable cache (read-only folder, no permission) is a warning: the entry is built into a
temporary folder that lives until the process exits, and the run goes on without caching.

Root (`root()`): the run's `paths.cache_dir` while `run()` executes (`using`); else the environment
variable `LP_CACHE_DIR`; else `~/.cache/lp`. `conf/paths/default.yaml` sets
`paths.cache_dir: ${oc.env:LP_CACHE_DIR,null}`, so the precedence is: `paths.cache_dir=...` on the
command line > `LP_CACHE_DIR` > `~/.cache/lp`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # of manifest.json
MANIFEST = "manifest.json"
_override: Path | None = None


def root() -> Path:
    """Root folder of every cache (see the module docstring for the precedence)."""
    if _override is not None:
        return _override
    env = os.environ.get("LP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lp"


@contextlib.contextmanager
def using(path: str | os.PathLike | None) -> Iterator[Path]:
    """Make `path` (None: keep the current root) the cache root inside the `with` block."""
    global _override
    before = _override
    if path is not None:
        _override = Path(path).expanduser()
    try:
        yield root()
    finally:
        _override = before


def normal_key(key: dict) -> dict:
    """`key` as plain JSON types (how it is stored in, and compared with, a manifest)."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def digest(key: dict) -> str:
    """20 hex digits of the SHA-256 of the key's canonical JSON (an entry's default name)."""
    return hashlib.sha256(json.dumps(normal_key(key), sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Fetched:
    value: Any
    path: Path  # the entry's folder (a temporary folder when the cache was not writable)
    hit: bool  # True: read from the cache; False: built by this process
    cached: bool = True  # False: the cache was not writable, `path` goes away at exit


def fetch(kind: str, key: dict, build: Callable[[Path], None], load: Callable[[Path], Any],
          name: str | None = None) -> Fetched:
    """`load(<entry folder>)` of the entry `<root>/<kind>/<name or digest(key)>`, building it first with
    `build(<empty folder>)` (which writes the entry's files) when it is missing, incomplete or corrupt."""
    key = normal_key(key)
    path = root() / kind / (name or digest(key))
    got = _read(path, key, load, warn=True)
    if got is not None:
        return Fetched(got[0], path, hit=True)
    try:
        with _locked(path):
            got = _read(path, key, load, warn=False)  # built by another process while this one waited
            if got is None:
                _publish(path, key, build)
    except _Unwritable as e:
        return _uncached(kind, build, load, str(e))
    if got is not None:
        return Fetched(got[0], path, hit=True)
    return Fetched(load(path), path, hit=False)


def read(kind: str, key: dict, load: Callable[[Path], Any], name: str | None = None) -> Any | None:
    """`load(<entry folder>)` of a complete entry, or None (a bad entry is reported; `store` replaces it)."""
    key = normal_key(key)
    got = _read(root() / kind / (name or digest(key)), key, load, warn=True)
    return None if got is None else got[0]


def store(kind: str, key: dict, build: Callable[[Path], None], name: str | None = None) -> Path | None:
    """Write (or replace) an entry with `build(<empty folder>)`; None, with a warning, if the cache is
    not writable. For entries that grow (SLEB's greedy steps); `fetch` is the usual way in."""
    key = normal_key(key)
    path = root() / kind / (name or digest(key))
    try:
        with _locked(path):
            _publish(path, key, build)
    except _Unwritable as e:
        log.warning("cache %s is not writable (%s): %s entry not saved", root(), e, kind)
        return None
    return path


class _Unwritable(OSError):
    pass


@contextlib.contextmanager
def _locked(path: Path):
    """Hold the entry's lock (creating its folder); `_Unwritable` if the cache cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _lock_path(path).parent.mkdir(exist_ok=True)
        lock = _Lock(_lock_path(path))
    except OSError as e:
        raise _Unwritable(f"{type(e).__name__}: {e}") from e
    with lock:
        yield


def _publish(path: Path, key: dict, build) -> None:
    """Build the entry in a private temporary folder and rename it into place (caller holds the lock)."""
    _clean_stale(path.parent, own=path.name)
    try:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise _Unwritable(f"{type(e).__name__}: {e}") from e
    try:
        build(tmp)
        _seal(tmp, key)
        if path.exists() or path.is_symlink():  # a bad entry (reported by _read) or one being replaced
            _remove(path)
        os.rename(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(path: Path, key: dict, load, warn: bool):
    """`(value,)` of a complete, valid entry; None if there is none (a bad one is reported if `warn`)."""
    if not (path.exists() or path.is_symlink()):
        return None
    problem = check(path, key)
    if problem is None:
        try:
            return (load(path),)
        except Exception as e:  # noqa: BLE001 - whatever a corrupt file raises: rebuild
            problem = f"unreadable ({type(e).__name__}: {e})"
    if warn:
        log.warning("cache entry %s is %s: removing and rebuilding it", path, problem)
    return None


def check(path: Path, key: dict) -> str | None:
    """None if `path` is a complete entry for `key`, else what is wrong with it."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"incomplete (no {MANIFEST})"
    except (OSError, ValueError) as e:
        return f"corrupt ({MANIFEST}: {type(e).__name__}: {e})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"of another cache format ({m.get('format') if isinstance(m, dict) else m!r}, expected {FORMAT})"
    if m.get("key") != key:
        return "for another key (same name)"
    for rel, size in (m.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"incomplete ({rel} is missing)"
        if f.stat().st_size != size:
            return f"truncated or changed ({rel}: {f.stat().st_size} bytes, manifest says {size})"
    return None


def _seal(tmp: Path, key: dict) -> None:
    """Write the manifest, apply the umask's permissions and fsync every file of a finished entry."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "key": key, "files": files}, indent=1))
    mask = umask()
    for p in [tmp, *tmp.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)  # some writers (safetensors) create 0600
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync(d)


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _lock_path(path: Path) -> Path:
    """`<root>/.locks/<kind>.<name>.lock` for the entry `<root>/<kind>/<name>`."""
    return path.parent.parent / ".locks" / f"{path.parent.name}.{path.name}.lock"


class _Lock:
    """Exclusive `flock` on a lock file (created with the umask's permissions); blocks until free."""

    def __init__(self, path: Path):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            self.fd = os.open(path, os.O_RDONLY)  # an existing lock file of another user: flock works read-only

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _clean_stale(folder: Path, own: str) -> None:
    """Remove temporary folders of writers that died: those of entry `own` (whose lock this process
    holds) and those whose entry's lock nobody holds (a live writer holds its lock until it renames)."""
    for tmp in folder.glob(".*.tmp-*"):
        name = tmp.name[1:].rsplit(".tmp-", 1)[0]
        if name == own or not _locked_elsewhere(_lock_path(folder / name)):
            log.info("cache: removing %s, left by a writer that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _locked_elsewhere(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave the folder alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _uncached(kind: str, build, load, why: str) -> Fetched:
    """Build into a private temporary folder (removed at exit) when the cache cannot be written."""
    log.warning("cache %s is not writable (%s): continuing without caching this %s entry", root(), why, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f"lp-{kind}-"))
    atexit.register(shutil.rmtree, tmp, True)
    build(tmp)
    return Fetched(load(tmp), tmp, hit=False, cached=False)
