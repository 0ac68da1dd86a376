"""One trainer per workdir: a lock file (`train.lock`) holding the host, pid, start time and
command of the trainer that owns the workdir.

The lock is created atomically (a complete file linked into place, or O_CREAT|O_EXCL where
links are not supported), so of two trainers starting together exactly one gets it. A
second trainer refuses to start, naming the holder. A lock whose trainer is gone is stale:
on the same host (its pid no longer runs, or now runs another program) the next trainer
takes it over and says so; a lock from another host is never taken over, since that
trainer may still run: the message says how to remove it when that host is gone. The lock
is released when training returns or raises (a SIGTERM stop returns); after a kill -9 the
next run on the same host takes the stale lock over.

A remote workdir (gs://...) has its lock as an object, through etils.epath, and a weaker
guarantee: an object store offers no exclusive create (epath exposes no generation
precondition), so a trainer writes the lock when it finds none, waits REMOTE_SETTLE_S and
reads it back, backing off when another trainer's lock is there. Two trainers can still
both start when one checks before the other writes but writes only after the other has
read its lock back (its check-to-write gap longer than the pause). The stale-lock takeover
has no O_EXCL guard there either: the stale lock is re-read and removed, and each trainer
taking over then writes and reads back as above.
"""
import contextlib
import datetime
import json
import os
import socket
import sys
import time
import uuid

from mllm_jax import storage

LOCK_NAME = "train.lock"
# Seconds a trainer waits between writing a remote lock and reading it back (see above).
REMOTE_SETTLE_S = 2.0


class WorkdirLockedError(FileExistsError):
    """Another trainer holds the workdir's lock."""


def lock_path(workdir: str) -> str:
    return storage.join(storage.absolute(workdir), LOCK_NAME)


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid):
    """The start time of process `pid` (clock ticks since boot; Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after "(comm)"
    except (IndexError, ValueError):
        return None


def _running(info) -> bool:
    """Whether the trainer a lock from this host names still runs."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return False  # the host restarted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    recorded, now = info.get("pid_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now  # else the pid was reused


def _describe(info) -> str:
    started = info.get("started", "?")
    try:
        ago = time.time() - float(info["started_unix"])
        started += f", {_duration(ago)} ago"
    except (KeyError, TypeError, ValueError):
        pass
    command = info.get("command")
    return (f"pid {info.get('pid')} on host {info.get('host')!r}, started {started}"
            + (f", command: {command}" if command else ""))


def _duration(seconds):
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def read_lock(workdir: str):
    """The lock's contents (dict), None when there is no lock; {} when it cannot be read."""
    path = lock_path(workdir)
    remote = storage.is_remote(path)
    for _ in range(20):  # a lock being written by O_EXCL is briefly empty
        try:
            if remote and not storage.exists(path):
                return None
            with storage.open_file(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            if isinstance(info, dict):
                return info
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)
    return {}


def _create(path, info) -> bool:
    """Creates the lock file holding `info` atomically; False when it exists."""
    if storage.is_remote(path):
        return _create_remote(path, info)
    data = json.dumps(info, indent=1).encode()
    tmp = f"{path}.{info['host']}.{info['pid']}.{info['token']}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and the lock is complete when it appears
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        os.unlink(tmp)


def _create_remote(path, info) -> bool:
    """`_create` on an object store: written when absent, then read back after
    REMOTE_SETTLE_S; False when the lock there is not this one (see the module doc for the
    race this leaves)."""
    if storage.exists(path):
        return False
    storage.write_atomic(path, json.dumps(info, indent=1))
    time.sleep(REMOTE_SETTLE_S)
    held = read_lock(storage.dirname(path))
    return bool(held) and held.get("token") == info["token"]


def _remove_stale(path, stale) -> None:
    """Removes the lock at `path` if it still is `stale` (the lock read and judged stale),
    under a short-lived guard so that two trainers taking over together cannot remove each
    other's fresh lock (remote: no such guard, see the module doc)."""
    if storage.is_remote(path):
        if read_lock(storage.dirname(path)) == stale:
            storage.remove(path)
        return
    guard = path + ".takeover"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:  # a guard left by a trainer killed during its takeover
            if time.time() - os.path.getmtime(guard) > 60:
                os.unlink(guard)
        except OSError:
            pass
        return
    try:
        current = read_lock(os.path.dirname(path))
        if current == stale:
            os.unlink(path)
    finally:
        os.close(fd)
        os.unlink(guard)


def acquire(workdir: str, *, log=print, command=None) -> dict:
    """Takes the workdir's lock (creating the workdir) and returns what it holds; a
    WorkdirLockedError naming the holder when another trainer has it."""
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    path = lock_path(workdir)
    host = socket.gethostname()
    now = time.time()
    info = {"host": host, "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "boot_id": _boot_id(),
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S UTC"),
            "started_unix": now, "command": command if command is not None
            else " ".join(sys.argv), "token": uuid.uuid4().hex}
    for _ in range(5):
        if _create(path, info):
            return info
        held = read_lock(workdir)
        if held is None:
            continue  # released meanwhile: try again
        if not held:
            raise WorkdirLockedError(
                f"workdir {workdir} is locked ({path} exists but cannot be read). If no "
                f"trainer is using this workdir, remove {path} and run again.")
        if held.get("host") != host:
            raise WorkdirLockedError(
                f"workdir {workdir} is in use by another trainer ({_describe(held)}); a "
                f"second trainer on one workdir would overwrite its checkpoints. Wait for "
                f"it to finish or use another --workdir. If host {held.get('host')!r} is "
                f"gone or that trainer no longer runs, remove {path} and run again.")
        if _running(held):
            raise WorkdirLockedError(
                f"workdir {workdir} is in use by another trainer ({_describe(held)}); a "
                f"second trainer on one workdir would overwrite its checkpoints. Wait for "
                f"it to finish, stop it (kill {held.get('pid')}: it checkpoints and exits), "
                f"or use another --workdir.")
        log(f"taking over the stale lock {path}: its trainer ({_describe(held)}) no longer "
            "runs")
        _remove_stale(path, held)
        time.sleep(0.1)
    raise WorkdirLockedError(f"workdir {workdir}: could not take the lock {path}; other "
                             "trainers are starting on it")


def release(workdir: str, info: dict) -> None:
    """Removes the lock if it is still the one `info` describes."""
    held = read_lock(workdir)
    if held and held.get("token") == info.get("token"):
        with contextlib.suppress(FileNotFoundError):
            storage.remove(lock_path(workdir))


@contextlib.contextmanager
def locked(workdir: str, *, log=print, command=None):
    """Holds the workdir's lock for the duration of the block (see `acquire`)."""
    info = acquire(workdir, log=log, command=command)
    try:
        yield info
    finally:
        release(workdir, info)


def holds_lock(cfg) -> bool:
    """Whether this process takes the workdir lock: the only process, or process 0 of a
    multi-process run (from `distributed.process_id`, or from JAX once it is initialized).
    None when it cannot be known before JAX's distributed system starts."""
    d = cfg.get("distributed") if hasattr(cfg, "get") else None
    if not d or not d.get("enabled"):
        return True
    if d.get("process_id") is not None:
        return int(d.process_id) == 0
    import jax
    if jax.distributed.is_initialized():
        return jax.process_index() == 0
    return None
