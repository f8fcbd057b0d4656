"""The one on-disk cache of lp: converted models, calibration statistics, selection scores, teacher logits.

Layout: `<root>/<kind>/<name>/` holds an entry's files plus `manifest.json` (cache format, the
entry's key, every file's size). Writing an entry (`fetch`):
  * into a private temporary folder (`.<name>.tmp-<host>-<pid>-<random>`), files fsynced and given the
    umask's permissions (a group-shared cache stays readable by the group), then renamed into place.
    This alone makes concurrent writers safe: readers only ever see a complete entry (the manifest
    is checked), and a writer that finds a valid entry already in place when it is done discards
    its own copy (a bad one is moved aside with a rename first);
  * under an exclusive lock, best effort (`<root>/.locks/<kind>.<name>.lock`, opened read-write, `fcntl.flock`),
    so that processes needing the same missing entry compute it once: the first builds, the others
    wait and then read it. Locking only saves work: a lock file that cannot be opened or a lock the
    filesystem refuses (NFS without lock daemon, Lustre mounted `noflock`, ...) is a warning and the
    entry is built unlocked. `paths.cache_locking=false` (`using(..., locking=False)`) turns locking
    off, for filesystems where `flock` misbehaves silently (Lustre `localflock`: per node only);
  * leftover temporary folders of writers known to be dead are removed by the next writer in the same
    folder: on this host, those whose process no longer exists; of other hosts (or of an older lp
    without the host in the name), those untouched for `STALE_S` (a day) whose entry's lock is free.
    This does not trust the lock, which may hold per node only (Lustre `localflock`) or not at all.
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
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # of manifest.json
MANIFEST = "manifest.json"
_override: Path | None = None
_locking = True  # paths.cache_locking (see `using`)
_lock_warned: set[str] = set()  # one warning per process and reason


def root() -> Path:
    """Root folder of every cache (see the module docstring for the precedence)."""
    if _override is not None:
        return _override
    env = os.environ.get("LP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lp"


@contextlib.contextmanager
def using(path: str | os.PathLike | None, locking: bool | None = None) -> Iterator[Path]:
    """Make `path` (None: keep the current root) the cache root inside the `with` block; `locking`
    (None: keep the current setting, default on) turns the best-effort entry locks on or off."""
    global _override, _locking
    before = _override, _locking
    if path is not None:
        _override = Path(path).expanduser()
    if locking is not None:
        if not isinstance(locking, bool):
            raise ValueError(f"paths.cache_locking={locking!r}: must be true or false")
        _locking = locking
    try:
        yield root()
    finally:
        _override, _locking = before


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
                _publish(path, key, build, replace=False)
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
            _publish(path, key, build, replace=True)
    except _Unwritable as e:
        log.warning("cache %s is not writable (%s): %s entry not saved", root(), e, kind)
        return None
    return path


class _Unwritable(OSError):
    pass


@contextlib.contextmanager
def _locked(path: Path):
    """Create the entry's folder and hold its lock if locking is on and the lock can be taken (best
    effort: see `_Lock`). `_Unwritable` if the cache folder cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Unwritable(f"{type(e).__name__}: {e}") from e
    if not _locking:
        yield
        return
    with _Lock(_lock_path(path)):
        yield


def _publish(path: Path, key: dict, build, replace: bool) -> None:
    """Build the entry in a private temporary folder and rename it into place (safe with or without the
    lock). `replace`: an existing valid entry is replaced (`store`); otherwise a valid entry another
    writer put in place first wins."""
    _clean_stale(path.parent, own=path.name)
    try:
        tmp = path.parent / f".{path.name}.tmp-{_writer()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise _Unwritable(f"{type(e).__name__}: {e}") from e
    try:
        build(tmp)
        _seal(tmp, key)
        _install(tmp, path, key, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, path: Path, key: dict, replace: bool, tries: int = 5) -> None:
    """Rename the sealed `tmp` to `path`, safe without a lock: an entry in the way (bad, or replaced)
    is first renamed aside (atomic: a reader sees the old entry or none, never half of one) and then
    removed; a rename that loses a race with another writer (ENOTEMPTY / EEXIST) is retried, and a
    valid entry found in place when not replacing is kept (`tmp` is then discarded by the caller)."""
    for _ in range(tries):
        if path.exists() or path.is_symlink():
            if not replace and check(path, key) is None:
                log.info("cache: %s was completed by another writer meanwhile; keeping it", path)
                return
            aside = path.parent / f".{path.name}.tmp-{_writer()}-old{secrets.token_hex(4)}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:  # another writer moved it first
                pass
            else:
                with contextlib.suppress(OSError):
                    _remove(aside)
        try:
            os.rename(tmp, path)
            return _fsync(path.parent)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # else: another writer's entry landed first
                raise
    raise OSError(errno.EBUSY, f"cache entry {path}: {tries} attempts to rename it into place lost to other writers")


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
    """Best-effort exclusive `flock` on a lock file opened read-write (created with the umask's
    permissions; NFS emulates flock with POSIX locks, which need write access); blocks until free.
    `held` is False, with a warning, when the file cannot be opened or the filesystem refuses the lock."""

    def __init__(self, path: Path):
        self.path, self.fd, self.held = path, None, False

    def __enter__(self):
        try:
            self.path.parent.mkdir(exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            _lock_warning(self.path, "cannot open the lock file", e)
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK (NFS without lockd), EOPNOTSUPP / EINVAL (Lustre noflock), ...
            _lock_warning(self.path, "the filesystem refused the lock", e)
            os.close(self.fd)
            self.fd = None
            return self
        self.held = True
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd, self.held = None, False


def _lock_warning(path: Path, what: str, e: OSError) -> None:
    """Warn (once per process and reason) that an entry is built without its lock."""
    reason = f"{what} ({type(e).__name__}: {e.strerror or e})"
    if reason in _lock_warned:
        return log.debug("cache lock %s: %s; building without it", path, reason)
    _lock_warned.add(reason)
    log.warning("cache lock %s: %s; building the entry without a lock (correct, but concurrent jobs may "
                "compute it twice; paths.cache_locking=false silences this)", path, reason)


STALE_S = 24 * 3600  # a temporary folder of another host untouched this long belongs to a dead writer


def _writer() -> str:
    """`<host>-<pid>` of this process, as temporary folder names carry it (dots in the host name kept)."""
    return f"{socket.gethostname().replace('/', '_')}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        pass
    return True


def _clean_stale(folder: Path, own: str) -> None:
    """Remove temporary folders left by writers that died (see the module docstring), never a live one's.
    `own`: the entry this process is writing (its lock, if any, is this process's: not asked)."""
    host = socket.gethostname().replace("/", "_")
    for tmp in folder.glob(".*.tmp-*"):
        name, _, writer = tmp.name[1:].rpartition(".tmp-")
        parts = writer.rsplit("-", 2)  # <host>-<pid>-<random>; older lp: <pid>-<random>
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            dead = not _pid_alive(int(parts[1]))
        else:
            try:
                old = time.time() - tmp.stat().st_mtime > STALE_S
            except OSError:
                continue
            dead = old and (name == own or not (_locking and _locked_elsewhere(_lock_path(folder / name))))
        if dead:
            log.info("cache: removing %s, left by a writer that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _locked_elsewhere(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
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
