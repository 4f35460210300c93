"""The spool: each process's append-only file of accepted events, moved into the SQLite outbox in batches.

Why: a webhook that commits one SQLite transaction per event spends most of its tail
latency in that commit (and in the WAL checkpoints every thousand pages bring). An
append to a file of one's own costs microseconds and keeps the same promise: the
page cache survives the process being killed exactly as SQLite's WAL does in the
``"process-crash"`` durability, and with ``"power-loss"`` each append is ``fsync``'ed
before the webhook answers, as each SQLite commit is then.

How:

- **Accept** = one append of one checksummed record (length, CRC-32, then the
  accept time, the ``event_id`` and the RudderStack event) to this process's spool
  file, with ``os.write``. Each live process holds an exclusive ``flock`` on its
  own file for as long as it runs.
- **Move**: a thread of the process (the *mover*) copies its spooled records into the
  store in one transaction per batch with the store's idempotent ``add_many``, then
  forgets them (the file is emptied once everything in it is in the store, or
  replaced by a new one when it has grown large). A crash between the commit and
  the forgetting makes the next mover add those records again: ``add_many`` leaves
  events already in the store as they are (delivered ones stay delivered).
- **Adopt**: a file whose lock anyone can take belongs to a process that is gone
  (killed, crashed, or exited before its last move). Any mover, any operator command
  that reads the outbox (``status``, ``flush``) and ``flask cio-rudder worker`` take
  such files over: move their records, then delete them.
- **Torn records**: a record cut short by a crash (or garbled by a power loss in the
  ``"process-crash"`` durability) fails its length or CRC check. It was never
  answered (the answer follows the whole append), so it and anything after it in
  that file are skipped with a warning, never forwarded as garbage.
- **Duplicates**: a retry is recognised by the store and by this process's own
  records not moved yet. A retry that reaches another process before the first
  copy was moved is accepted twice (its receivers run twice, as they may anyway);
  the store's idempotent insert keeps one, so it is forwarded once.

The spool is only used with the SQLite outbox: both live on the local disk of one
machine. A PostgreSQL outbox exists for apps whose local disk does not survive a
deploy or the loss of a machine; a spool there would keep accepted events on that
disk, so the webhook writes to PostgreSQL directly. ``flock`` is POSIX: on Windows
the SQLite outbox is written directly too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import threading
import time
import uuid
import weakref
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .store import OutboxStore, Pending, StoreError

if TYPE_CHECKING:
    from .sender import Sender

if sys.platform != "win32":
    import fcntl

__all__ = ["Spool", "decode_records", "encode_record", "spool_for"]

logger = logging.getLogger("flask_cio_rudder")

#: Each record: the length of its body and the body's CRC-32, then the body.
_HEADER = struct.Struct("<II")
#: The body starts with the accept time (seconds since the epoch) and the byte length of the
#: ``event_id``; the ``event_id`` (UTF-8, lone surrogates kept) and the RudderStack event follow.
_BODY_START = struct.Struct("<dI")
#: No record is near this long (events are at most 32 KB); a longer length means a torn header.
_MAX_RECORD = 16 * 1024 * 1024

#: Seconds stop() waits for the mover's last move even when told 0 (CIO_RUDDER_SHUTDOWN_TIMEOUT = 0
#: means not waiting on RudderStack; a move into the store takes milliseconds).
_LEAST_STOP_WAIT = 1.0

#: How many new files ``_open`` makes before it gives up, each taken by another mover before its lock.
_OPEN_TRIES = 5

#: A spool file of a live process ends in this; a file being created (not yet locked) in ``.new``.
_SUFFIX = ".spool"
_CREATING = ".new"


def encode_record(event_id: str, payload_json: str, accepted_at: float) -> bytes:
    """One spool record: header (length, CRC-32) and body (accept time, event id, event)."""
    key = event_id.encode("utf-8", "surrogatepass")  # JSON can carry lone surrogates in ids
    body = _BODY_START.pack(accepted_at, len(key)) + key + payload_json.encode("utf-8")
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_records(data: bytes) -> tuple[list[Pending], int]:
    """The whole records at the start of ``data``, and how many bytes after them are not one.

    Reading stops at the first record that is cut short or fails its CRC: a crash tore
    it, so it was never answered, and no length after it can be trusted.
    """
    records = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if not _BODY_START.size <= length <= _MAX_RECORD or start + length > len(data):
            break
        body = data[start : start + length]
        if zlib.crc32(body) != crc:
            break
        accepted_at, key_length = _BODY_START.unpack_from(body)
        key_end = _BODY_START.size + key_length
        try:
            event_id = body[_BODY_START.size : key_end].decode("utf-8", "surrogatepass")
            payload_json = body[key_end:].decode("utf-8")
        except UnicodeDecodeError:  # a CRC match on garbage: as torn
            break
        records.append(Pending(event_id, payload_json, accepted_at))
        offset = start + length
    return records, len(data) - offset


@dataclass
class _File:
    """One of this process's spool files: bytes appended, and how many of them are in the store."""

    fd: int
    path: str
    end: int = 0
    moved: int = 0
    #: No more appends: it has grown large, or a failed append could not be cut off again.
    retired: bool = False


class Spool:
    """This process's spool of accepted events for one store, and the thread that moves it there.

    Safe to use from many threads and across ``fork()``: a child starts with no file of
    its own and opens one on its first append.
    """

    #: After an append wakes the mover, how long it lets a batch build up (seconds). This is
    #: also how long a retry on another process can be accepted a second time.
    LINGER = 0.1
    #: How often the mover looks for files of dead processes when nothing wakes it (seconds).
    ADOPT_EVERY = 5.0
    #: A file that has grown this large is replaced by a new one once moved (bytes).
    ROTATE_BYTES = 4 * 1024 * 1024
    #: How long the mover waits after the store failed before it tries again (seconds).
    RETRY_WAIT = 1.0

    def __init__(
        self,
        directory: str,
        store: OutboxStore,
        *,
        fsync: bool = False,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.time,
        file_mode: int = 0o600,
    ) -> None:
        self.directory = directory
        self.store = store
        self.fsync = fsync
        #: This process's sender: woken after each move, and handed what it can send at once.
        self.sender = sender
        self.clock = clock
        self.file_mode = file_mode
        self._fresh_process_state()
        _live_spools.add(self)

    def _fresh_process_state(self) -> None:
        """Everything that must not cross a fork: files (and their locks), threads, locks."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # appends, and the bookkeeping of what was moved
        self._move_lock = threading.Lock()  # one move at a time
        self._files: list[_File] = []  # oldest first; appends go to the last one
        # Ids appended here and not yet in the store, with their search columns (name, email):
        # the mover then need not decode each event again to fill them.
        self._unmoved: dict[str, tuple[str | None, str | None]] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reported_store_error = False
        self._unreadable: set[str] = set()  # files of dead processes this one cannot open (reported)

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked without the fork hook
            self._after_fork()

    # -- the web request's side ----------------------------------------------------------------

    def append(
        self, event_id: str, payload_json: str, *, event_name: str | None = None, email: str | None = None
    ) -> None:
        """Keep an accepted event in this process's file; durable as the store's durability asks on return.

        ``event_name`` and ``email`` go to the store's search columns (as with ``OutboxStore.add``).

        Raises ``OSError`` (disk full, say) with nothing kept: a failed append is cut off again.
        """
        self._check_process()
        record = encode_record(event_id, payload_json, self.clock())
        with self._lock:
            file = self._files[-1] if self._files and not self._files[-1].retired else self._open()
            try:
                _write_all(file.fd, record)
                if self.fsync:
                    os.fsync(file.fd)
            except OSError:
                self._cut_back(file)
                raise
            file.end += len(record)
            self._unmoved[event_id] = (event_name, email)
        if not self._wake.is_set():  # set already while the mover lingers: setting it again costs a notify
            self._wake.set()

    def holds(self, event_id: str) -> bool:
        """Whether this process accepted ``event_id`` and has not moved it into the store yet."""
        self._check_process()
        with self._lock:
            return event_id in self._unmoved

    def _open(self) -> _File:
        """A new file for this process, locked before it can be seen under its final name.

        Were it locked after, another mover could take the still-unlocked empty file for
        a dead process's, delete it, and this process would append to a deleted file.
        Another mover can still take it in the instant between its creation and its lock
        (it then deletes it, as a dead process's ``.new`` file): then a new one is made.
        """
        searchable = (self.file_mode & 0o444) >> 2  # whoever may read the files may list the folder
        os.makedirs(self.directory, mode=self.file_mode | searchable, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        for tries_left in reversed(range(_OPEN_TRIES)):
            name = f"{os.getpid()}-{uuid.uuid4().hex}"
            creating = os.path.join(self.directory, name + _CREATING)
            path = os.path.join(self.directory, name + _SUFFIX)
            fd = os.open(creating, flags, self.file_mode)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(creating, path)
            except (BlockingIOError, FileNotFoundError):  # taken, or deleted, by another mover
                os.close(fd)
                if tries_left:
                    continue
                raise
            except BaseException:
                os.close(fd)
                raise
            break
        try:
            if self.fsync:  # the file's name must survive a power loss too, not only its bytes
                _fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        file = _File(fd, path)
        self._files.append(file)
        return file

    def _cut_back(self, file: _File) -> None:
        """Undo a failed append; if even that fails, retire the file so that no record follows the torn one.

        The mover still moves the file's whole records (up to ``end``) and then deletes it.
        """
        try:
            os.ftruncate(file.fd, file.end)
        except OSError:
            file.retired = True

    # -- moving --------------------------------------------------------------------------------

    def move(self, *, adopt: bool = True) -> int:
        """Move this process's spooled records into the store, and (``adopt``) dead processes' files.

        Returns how many records were moved. Raises :class:`~flask_cio_rudder.store.StoreError`
        when the store cannot take them: they stay spooled for the next try.
        """
        self._check_process()
        with self._move_lock:
            moved = self._move_own()
            if adopt:
                moved += self._adopt()
        if moved and self.sender is not None:
            self.sender.wake()
        return moved

    def _move_own(self) -> int:
        with self._lock:
            if self._files and self._files[-1].end >= self.ROTATE_BYTES:
                self._files[-1].retired = True  # appends go to a new file; this one is deleted once moved
            spans = [(file, file.moved, file.end) for file in self._files]
            searched = dict(self._unmoved)
        moved = 0
        for file, start, end in spans:
            records: list[Pending] = []
            if end > start:
                records, torn = decode_records(os.pread(file.fd, end - start, start))
                if torn:  # appends are whole or cut back, so this is a bug: say so, and skip them
                    logger.error("The spool file %s holds %d bytes that are no record", file.path, torn)
                unknown = (None, None)
                records = [
                    Pending(r.event_id, r.payload_json, r.accepted_at, *searched.get(r.event_id, unknown))
                    for r in records
                ]
                self._add(records, own=True)
                moved += len(records)
            with self._lock:
                file.moved = end
                for record in records:
                    self._unmoved.pop(record.event_id, None)
                if file.moved == file.end:
                    self._forget(file)
        return moved

    def _forget(self, file: _File) -> None:
        """Drop a file whose records are all in the store: delete it if retired, else empty it (lock held)."""
        if file.retired:
            self._files.remove(file)
            _delete(file)
            return
        try:
            os.ftruncate(file.fd, 0)
        except OSError:
            return  # kept as it is; the next move tries again
        file.end = file.moved = 0

    def _adopt(self) -> int:
        """Move and delete the files of processes that are gone (whose lock anyone can take)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        own = {file.path for file in self._files}
        moved = 0
        for name in names:
            path = os.path.join(self.directory, name)
            if path in own or not name.endswith((_SUFFIX, _CREATING)):
                continue
            try:
                fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:  # adopted by another mover meanwhile
                continue
            except OSError as error:  # one file this process may not open must not stop the others
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    logger.error(
                        "Cannot take over the spool file %s (%s): give this app's user read and write "
                        "access to it, and its events are moved at the next look",
                        path,
                        error.strerror or error,
                    )
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its process lives
                    continue
                if not _still_named(fd, path):  # another mover adopted and deleted it meanwhile
                    continue
                if name.endswith(_SUFFIX):
                    records, torn = decode_records(_read_all(fd))
                    if torn:
                        logger.warning(
                            "Skipped %d bytes at the end of the spool of a process that died (%s): "
                            "a record its crash cut short, never answered",
                            torn,
                            name,
                        )
                    self._add(records, own=False)
                    moved += len(records)
                os.unlink(path)
            finally:
                os.close(fd)
        if moved:
            logger.info("Moved %d accepted events left by processes that are gone into the outbox", moved)
        return moved

    def _add(self, records: list[Pending], *, own: bool) -> None:
        """Put records into the store in one transaction; those already there are left as they are.

        While this process's sender is sending, its ``own`` records go in leased to it, and it
        sends them next without claiming them (which would rewrite each row once more).
        """
        sender = self.sender
        if own and sender is not None and sender.takes_offers:
            sender.offer(self.store.add_claimed(records, sender.lease, sender.max_age))
        else:
            self.store.add_many(records)

    # -- the mover thread ----------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start this process's mover thread unless it runs already (cheap; called per request)."""
        if self._thread is not None and self._pid == os.getpid():
            return
        self._check_process()
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                thread = threading.Thread(target=self._run, name="cio-rudder-spool", daemon=True)
                thread.start()  # if it cannot start, the next call tries again
                self._thread = thread

    def _run(self) -> None:
        next_adoption = 0.0  # at once: a restarted server takes over what its predecessor left
        while not self._stopping.is_set():
            adopt = time.monotonic() >= next_adoption
            try:
                self.move(adopt=adopt)
            except StoreError as error:
                if not self._reported_store_error:
                    logger.warning("Cannot move accepted events into the outbox, will retry: %s", error)
                    self._reported_store_error = True
                self._stopping.wait(self.RETRY_WAIT)
                continue
            except Exception:  # a bug must not stop the moving silently
                logger.exception("The Customer.io spool mover failed; retrying")
                self._stopping.wait(self.RETRY_WAIT)
                continue
            self._reported_store_error = False
            if adopt:
                next_adoption = time.monotonic() + self.ADOPT_EVERY
            if self._wake.wait(self.ADOPT_EVERY):
                self._stopping.wait(self.LINGER)
            self._wake.clear()
        self._last_move()
        self._close_files()  # also when stop() stopped waiting: the files are then adoptable

    def _last_move(self) -> None:
        try:
            self.move(adopt=False)
        except StoreError as error:
            logger.warning("Accepted events stay in the spool for the next start: %s", error)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the mover, move what is left, and close this process's files (deleting the moved ones).

        The mover's thread makes the last move, waited for ``timeout`` seconds (one at least):
        behind another process's write lock (a process stopped inside a transaction, an ``sqlite3``
        shell's open one) it waits as long as that lasts, and gunicorn starts no worker in place of
        one that has not exited. Says whether it ended; if not, the thread closes the files once its
        move is done, and a file whose records were not moved stays, unlocked: the next mover adopts it.
        """
        stopped_before = self._stopping.is_set()  # then it was waited for already
        self._stopping.set()
        self._wake.set()
        if self._pid != os.getpid():
            return True
        thread = self._thread
        if thread is None:  # no mover ran (nothing was spooled here, as a rule)
            self._last_move()
        else:
            if not stopped_before:
                thread.join(max(timeout, _LEAST_STOP_WAIT))
            if thread.is_alive():
                return False
        return self._close_files(timeout)

    def _close_files(self, timeout: float | None = None) -> bool:
        """Close this process's files, deleting those whose records were all moved; False if a move
        still ran after ``timeout`` seconds (the files then close with the process)."""
        if not self._move_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            with self._lock:
                files, self._files = self._files, []
                for file in files:
                    if file.moved == file.end:
                        _delete(file)
                    else:
                        os.close(file.fd)
        finally:
            self._move_lock.release()
        return True

    def _after_fork(self) -> None:
        """In a child: let go of the parent's files (the parent keeps their locks) and start afresh."""
        for file in self._files:
            with contextlib.suppress(OSError):
                os.close(file.fd)
        was_running, stopped = self._thread is not None, self._stopping.is_set()
        self._fresh_process_state()
        if stopped:  # stopped (its outbox closed) before the fork: it stays stopped in the child
            self._stopping.set()
        elif was_running:
            self.ensure_running()


def spool_for(store: OutboxStore, *, durability: str, sender: Sender | None = None) -> Spool | None:
    """The spool of an SQLite outbox (beside its file, one folder per table), or ``None`` if it has none.

    A PostgreSQL outbox has none: see this module's docstring. Nor has any outbox on Windows (no ``flock``).
    """
    path: str | None = getattr(store, "path", None)
    if path is None or sys.platform == "win32":
        return None
    try:
        mode = os.stat(path).st_mode & 0o666
    except OSError:
        mode = 0o600
    directory = f"{path}.{store.table}.spool"
    return Spool(directory, store, fsync=durability == "power-loss", sender=sender, file_mode=mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not deleted, not replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _delete(file: _File) -> None:
    """Delete a fully moved file of this process, then close it (unlinking first keeps it from adoption)."""
    with contextlib.suppress(OSError):  # if left behind, empty: the next adoption deletes it
        os.unlink(file.path)
    os.close(file.fd)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Spools alive in this process, so a fork can reset each of them in the child.
_live_spools: weakref.WeakSet[Spool] = weakref.WeakSet()


def _reset_spools_in_child() -> None:
    for spool in list(_live_spools):
        spool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_spools_in_child)
