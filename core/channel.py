"""The queue between a trainer and its followers: events out, controls in.

The trainer (rank 0) listens on a Unix socket; every follower, the window that started the
run and one that attaches later alike, connects to it. A follower replays the run's
``events.jsonl`` up to the position the trainer names when it connects, then takes every
later event live, and sends controls (stop, save, abort), each answered once the trainer
has taken it.

Only the run's owner gets in. GPU boxes are shared, so:

- the socket and the key live in the run's ``.trainer/`` folder, mode 0700, and the key
  file is mode 0600: another user cannot reach the socket or read the key;
- the trainer refuses a peer whose uid is not its own (``SO_PEERCRED``) before a byte
  is read from it;
- both sides prove they know the key (HMAC-SHA256 challenges, both ways) before anything
  else is said;
- messages are length-prefixed JSON, never pickle, and a message over :data:`FRAME_MAX`
  ends the connection.

A follower that does not keep up is dropped (the trainer never waits on it, and nothing
queues without bound); it reconnects and takes what it missed from the file. Stdlib only:
the UI process uses this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import secrets
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .events import encode_line
from .runs import PRIVATE_DIR, read_record

KEY_FILE = "key"
SOCKET_FILE = "sock"
MAGIC = b"tunedeck-run-1\n"
FRAME_MAX = 16 * 2**20
HANDSHAKE_S = 5.0
FOLLOWER_QUEUE = 20_000  # frames waiting for one follower before it is dropped
_HEADER = struct.Struct(">I")


class ChannelError(Exception):
    """The trainer cannot be reached, refused us, or went away."""


# -- the run's private folder, key and address ---------------------------------------------------


def private_dir(run_dir: str | os.PathLike[str], create: bool = False) -> Path:
    """``run_dir/.trainer``: mode 0700, owned by this user (refused otherwise)."""
    path = Path(run_dir) / PRIVATE_DIR
    if create:
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    _check_private(path, directory=True)
    return path


def _check_private(path: Path, directory: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ChannelError(f"{path} does not exist") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok or st.st_uid != os.getuid():
        raise ChannelError(f"{path} is not this user's {'folder' if directory else 'file'}")
    if st.st_mode & 0o077:
        if directory:
            os.chmod(path, 0o700)
        else:
            raise ChannelError(f"{path} is readable by other users")


def ensure_key(run_dir: str | os.PathLike[str]) -> bytes:
    """The run's channel key (32 random bytes, mode 0600), made on first use."""
    path = private_dir(run_dir, create=True) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_key(run_dir)
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return key


def read_key(run_dir: str | os.PathLike[str]) -> bytes:
    path = private_dir(run_dir) / KEY_FILE
    _check_private(path, directory=False)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ChannelError(f"cannot read {path} ({exc.strerror})") from None
    if len(key) < 16:
        raise ChannelError(f"{path} is not a key")
    return key


def default_address(run_dir: str | os.PathLike[str]) -> str:
    """Where the trainer of ``run_dir`` listens: in its private folder, or (when that path is
    too long for a Unix socket) in a private folder of this user under the temp dir."""
    path = str(Path(run_dir).resolve() / PRIVATE_DIR / SOCKET_FILE)
    if len(os.fsencode(path)) < 100:
        return path
    short = Path(tempfile.gettempdir()) / f"tunedeck-{os.getuid()}"
    try:
        short.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_private(short, directory=True)
    digest = hashlib.sha256(os.fsencode(str(Path(run_dir).resolve()))).hexdigest()[:20]
    return str(short / f"{digest}.sock")


def address_of(run_dir: str | os.PathLike[str]) -> str:
    """The address a live trainer of ``run_dir`` named in its record (else the default)."""
    record = read_record(run_dir) or {}
    address = record.get("address")
    return address if isinstance(address, str) and address else default_address(run_dir)


# -- frames and the handshake ------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ChannelError("the connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _frame(obj: dict[str, Any]) -> bytes:
    data = encode_line(obj)
    return _HEADER.pack(len(data)) + data


def _recv_frame(sock: socket.socket) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > FRAME_MAX:
        raise ChannelError(f"a message of {size} bytes is over the limit")
    try:
        obj = json.loads(_recv_exact(sock, size))
    except (ValueError, UnicodeDecodeError):
        raise ChannelError("a message that is not JSON") from None
    if not isinstance(obj, dict):
        raise ChannelError("a message that is not a JSON object")
    return obj


def _mac(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, hashlib.sha256).digest()


def _serve_handshake(sock: socket.socket, key: bytes) -> None:
    nonce = secrets.token_bytes(32)
    sock.sendall(MAGIC + nonce)
    answer = _recv_exact(sock, 64)
    if not hmac.compare_digest(answer[:32], _mac(key, b"follower", nonce)):
        raise ChannelError("the follower does not know the run's key")
    sock.sendall(_mac(key, b"trainer", answer[32:]))


def _answer_handshake(sock: socket.socket, key: bytes) -> None:
    greeting = _recv_exact(sock, len(MAGIC) + 32)
    if not greeting.startswith(MAGIC):
        raise ChannelError("not a tunedeck trainer")
    nonce = secrets.token_bytes(32)
    sock.sendall(_mac(key, b"follower", greeting[len(MAGIC):]) + nonce)
    try:
        proof = _recv_exact(sock, 32)
    except ChannelError:
        raise ChannelError("the trainer refused us: the run's key does not match") from None
    if not hmac.compare_digest(proof, _mac(key, b"trainer", nonce)):
        raise ChannelError("the trainer does not know the run's key")


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux), else None."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _shut(sock: socket.socket, close: bool = True) -> None:
    """End a connection: a thread blocked reading it wakes up at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    if close:
        try:
            sock.close()
        except OSError:
            pass


# -- the trainer's side ---------------------------------------------------------------------------


class _Follower:
    """One connected follower: frames queue for it (bounded) and a thread sends them."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.server = server
        self.frames: queue.Queue[bytes | None] = queue.Queue(FOLLOWER_QUEUE)
        self.closed = threading.Event()
        self.sender = threading.Thread(target=self._send_loop, name="tunedeck-channel-send", daemon=True)

    def push(self, frame: bytes | None) -> None:
        try:
            self.frames.put_nowait(frame)
        except queue.Full:  # it does not keep up: drop it; it takes what it missed from the file
            self.close()

    def _send_loop(self) -> None:
        try:
            while not self.closed.is_set():
                frame = self.frames.get()
                if frame is None:
                    break
                self.sock.sendall(frame)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        _shut(self.sock, close=False)
        try:
            self.frames.put_nowait(None)
        except queue.Full:
            pass
        self.server._forget(self)


class Server:
    """The trainer's end: writes each event to the run's log and to every follower.

    ``log`` is the run's :class:`~tunedeck.core.events.EventLog`; ``on_control(action)``
    is called from a connection thread for each control and returns ``(taken, message)``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], log: Any,
                 on_control: Callable[[str], tuple[bool, str]]) -> None:
        self.run_dir = Path(run_dir)
        self.log = log
        self.on_control = on_control
        self.key = ensure_key(run_dir)
        self.address = default_address(run_dir)
        self._lock = threading.RLock()  # orders writes to the log with followers joining
        self._followers: set[_Follower] = set()
        self._closing = threading.Event()
        try:
            os.unlink(self.address)  # a socket left by a trainer that was killed
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        os.chmod(self.address, 0o600)
        self._sock.listen(16)
        self._accepter = threading.Thread(target=self._accept_loop, name="tunedeck-channel", daemon=True)
        self._accepter.start()

    # -- events out --------------------------------------------------------------------------

    def emit(self, ev: dict[str, Any]) -> None:
        """Append ``ev`` to the log and send it to every follower (never waiting on one).
        An error writing the log (a full disk) is raised after the followers have it."""
        with self._lock:
            at = self.log.offset
            error: OSError | None = None
            try:
                self.log.write(ev)
            except OSError as exc:
                error = exc
            if self._followers:
                frame = _frame({"at": at, "end": self.log.offset, "event": ev})
                for follower in list(self._followers):
                    follower.push(frame)
        if error is not None:
            raise error

    # -- followers ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="tunedeck-channel-peer", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():
                raise ChannelError(f"refused a connection from uid {uid}")
            sock.settimeout(HANDSHAKE_S)
            _serve_handshake(sock, self.key)
        except (ChannelError, OSError):
            sock.close()
            return
        sock.settimeout(None)
        follower = _Follower(sock, self)
        with self._lock:
            follower.push(_frame({"hello": True, "offset": self.log.offset, "pid": os.getpid()}))
            self._followers.add(follower)
        follower.sender.start()
        try:
            while not follower.closed.is_set():
                message = _recv_frame(sock)
                action = message.get("control")
                if action is None:
                    continue
                try:
                    taken, text = self.on_control(str(action))
                except Exception as exc:  # noqa: BLE001 - a control must never kill the channel
                    taken, text = False, f"{exc.__class__.__name__}: {exc}"
                follower.push(_frame({"ack": message.get("id"), "taken": taken, "message": text}))
        except (ChannelError, OSError):
            pass
        finally:
            follower.close()

    def _forget(self, follower: _Follower) -> None:
        with self._lock:
            self._followers.discard(follower)

    def close(self, drain_s: float = 2.0) -> None:
        """Stop listening; give followers up to ``drain_s`` to receive what is queued."""
        self._closing.set()
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            os.unlink(self.address)
        except OSError:
            pass
        deadline = time.monotonic() + drain_s
        for follower in list(self._followers):
            while not follower.frames.empty() and not follower.closed.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            follower.close()


# -- a follower's side ---------------------------------------------------------------------------


class Client:
    """A connection to a run's trainer. A reader thread takes events (kept for
    :meth:`events`, at most ``keep`` of them; past that the connection is dropped and the
    caller reads the file) and the answers to :meth:`control`."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any], keep: int) -> None:
        self.sock = sock
        self.offset = int(hello.get("offset") or 0)
        self.pid = hello.get("pid")
        self._events: queue.Queue[dict[str, Any]] = queue.Queue(max(1, keep))
        self._keep = keep > 0
        self._acks: dict[int, dict[str, Any]] = {}
        self._ack_ready = threading.Condition()
        self._ids = 0
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="tunedeck-channel-follow", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, run_dir: str | os.PathLike[str], timeout: float = 2.0, keep: int = 50_000) -> Client:
        """Connect and prove who we are; raises ChannelError. ``keep=0``: controls only."""
        key = read_key(run_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address_of(run_dir))
            _answer_handshake(sock, key)
            hello = _recv_frame(sock)
        except (OSError, ChannelError) as exc:
            sock.close()
            raise ChannelError(str(exc) if isinstance(exc, ChannelError) else (exc.strerror or str(exc))) from None
        if not hello.get("hello"):
            sock.close()
            raise ChannelError("the trainer did not greet")
        sock.settimeout(None)
        return cls(sock, hello, keep)

    def _read_loop(self) -> None:
        try:
            while True:
                message = _recv_frame(self.sock)
                if "ack" in message:
                    with self._ack_ready:
                        self._acks[message["ack"]] = message
                        self._ack_ready.notify_all()
                elif "event" in message and self._keep:
                    try:
                        self._events.put_nowait(message)
                    except queue.Full:  # nobody reads: stop taking events
                        break
        except (ChannelError, OSError, ValueError, struct.error):
            pass
        finally:
            self.closed.set()
            with self._ack_ready:
                self._ack_ready.notify_all()
            try:
                self.sock.close()
            except OSError:
                pass

    def events(self, timeout: float) -> list[dict[str, Any]]:
        """Frames ``{"at", "end", "event"}`` that arrived, waiting at most ``timeout`` for one."""
        out: list[dict[str, Any]] = []
        try:
            out.append(self._events.get(timeout=max(0.0, timeout)) if timeout > 0 else self._events.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def control(self, action: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a control; returns the trainer's answer ``{"taken", "message"}``."""
        with self._send_lock:
            self._ids += 1
            request = self._ids
            try:
                self.sock.sendall(_frame({"control": action, "id": request}))
            except OSError as exc:
                raise ChannelError(f"the trainer went away ({exc.strerror or exc})") from None
        deadline = time.monotonic() + timeout
        with self._ack_ready:
            while request not in self._acks:
                left = deadline - time.monotonic()
                if self.closed.is_set() or left <= 0:
                    raise ChannelError("the trainer did not answer" if left <= 0 else "the trainer went away")
                self._ack_ready.wait(left)
            return self._acks.pop(request)

    def close(self) -> None:
        self.closed.set()
        _shut(self.sock)
