"""A fork server: one small helper process that forks the block children.

Forking from the orchestrating process itself made a block slow: after a fork, every
page the orchestrator writes (and Python writes to each object it touches, to count
references) must first be copied, and on some virtual machines a page fault is dear.
An empty fork per block cost the orchestrator more than the orchestration itself, and
its exit got slower too (the figures are in the README's performance section).

So the orchestrator never forks. It starts this module as a new interpreter (with
`subprocess`, which uses vfork: nothing is shared, nothing copied), which imports only the
block executor, not Django's app registry. The server forks the children, one ahead
and waiting so that a block does not wait for a fork, and reaps them.

Protocol, over a SOCK_SEQPACKET socket pair:
- client -> server: b"spawn" with four file descriptors (the spec pipe's read end and
  the write ends of stdout, stderr and the message pipe); the server answers b"pid N".
- client -> server: b"preload mod1 mod2": import modules so later children have them.
- server -> client: b"exit PID STATUS" whenever a child ends (the server reaps them).
- EOF from the client (it exited): the server kills its children's groups and exits.
"""

from __future__ import annotations

import gc
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from pipelines.execution.libc import libc_function

_ENTRY = "import sys; from pipelines.execution.forkserver import main; main(sys.argv)"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MAX_MESSAGE = 256


class ForkServerError(OSError):
    pass


class ForkServer:
    def __init__(self, run_path: str) -> None:
        """Start a server whose children run the block function named by `run_path`
        ("package.module:function", called as function(spec, logger, context))."""
        self.owner = os.getpid()
        self.exits: dict[int, int] = {}
        # The environment the server (and so every child) starts with: a child is sent
        # the caller's environment only when it has changed since (see `environ_changed`).
        self.environ = environ_snapshot()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The server needs this project on its path to start; once started it puts
        # PYTHONPATH back as the caller has it, so blocks see the caller's environment.
        own_path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, own_path])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, str(theirs.fileno()), run_path, "-" if own_path is None else f"={own_path}"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, cwd=_ROOT,
        )
        theirs.close()
        self.pid = self.proc.pid

    def environ_changed(self) -> bool:
        """Whether the caller's environment differs from the one the server started with."""
        return _environ_now() != self.environ

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.sock.fileno() >= 0 and self.proc.poll() is None

    def spawn(self, fds: list[int]) -> int:
        """Start a child with these four descriptors; returns its pid."""
        try:
            socket.send_fds(self.sock, [b"spawn"], fds)
            while True:
                message = self._receive(timeout=30.0)
                if message.startswith(b"pid "):
                    return int(message.split()[1])
        except OSError as exc:
            raise ForkServerError(f"fork server failed: {exc}") from exc

    def preload(self, modules: list[str]) -> None:
        try:
            self.sock.send(("preload " + " ".join(modules)).encode())
        except OSError:
            pass

    def exit_status(self, pid: int, timeout: float = 10.0) -> int | None:
        """The wait status of child `pid`, waiting up to `timeout` for it to end."""
        try:
            while pid not in self.exits:
                self._receive(timeout=timeout)
        except (OSError, TimeoutError):
            return None
        return self.exits.pop(pid)

    def forget_exits(self) -> None:
        """Read the exit notices waiting on the socket (children whose result arrived
        need no status), so they never fill its buffer."""
        self.sock.setblocking(False)
        try:
            while True:
                self._record(self.sock.recv(_MAX_MESSAGE))
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.sock.setblocking(True)
        self.exits.clear()

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def _receive(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise TimeoutError("no answer from the fork server")
        message = self.sock.recv(_MAX_MESSAGE)
        if not message:
            raise ForkServerError("the fork server has ended")
        self._record(message)
        return message

    def _record(self, message: bytes) -> None:
        if not message:
            raise ForkServerError("the fork server has ended")
        if message.startswith(b"exit "):
            _, pid, status = message.split()
            self.exits[int(pid)] = int(status)


def _environ_now() -> dict:
    """This process's environment as it is, cheaply: os.environ keeps its raw bytes in
    `_data`, which compares in C, where building a dict of str decodes every entry."""
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else dict(os.environ)


def environ_snapshot() -> dict:
    """A copy of `_environ_now()`, to compare with later."""
    return dict(_environ_now())


class _Server:
    """The server's loop. It keeps one child forked ahead; on a spawn request it hands
    that child its descriptors and forks the next."""

    def __init__(self, sock: socket.socket, child_main: Callable[[int, int], None]) -> None:
        self.sock = sock
        self.child_main = child_main
        self.children: set[int] = set()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the client to handle
        self.ahead: tuple[int, socket.socket] | None = None

    def serve(self) -> None:
        self.ahead = self._fork_ahead()
        try:
            while True:
                try:
                    ready, _, _ = select.select([self.sock, self.wake_r], [], [])
                except InterruptedError:
                    continue
                if self.wake_r in ready:
                    os.read(self.wake_r, 512)
                    self._reap()
                if self.sock in ready and not self._request():
                    return
        finally:
            for pid in self.children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _request(self) -> bool:
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MESSAGE, 4)
        except ConnectionResetError:
            return False
        if not message:
            return False
        if message == b"spawn":
            pid, channel = self.ahead or self._fork_ahead()
            self.ahead = None
            socket.send_fds(channel, [b"go"], fds)
            channel.close()
            for fd in fds:
                os.close(fd)
            self.sock.send(f"pid {pid}".encode())
            self.ahead = self._fork_ahead()
        elif message.startswith(b"preload "):
            for name in message.decode().split()[1:]:
                try:
                    __import__(name)
                except Exception:  # noqa: BLE001 - only an optimisation
                    pass
            # The child forked ahead does not have them: replace it.
            if self.ahead is not None:
                pid, channel = self.ahead
                channel.close()  # it reads EOF and exits
                self.ahead = self._fork_ahead()
        return True

    def _fork_ahead(self) -> tuple[int, socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server_pid = os.getpid()
        # What exists now goes to the permanent generation: a collection in the child
        # never walks (and so never copies, page by page) the inherited heap.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent(server_pid)
                os.setpgid(0, 0)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                self.sock.close()
                mine.close()
                os.close(self.wake_r)
                if self.ahead is not None:
                    self.ahead[1].close()
                _, fds, _, _ = socket.recv_fds(theirs, _MAX_MESSAGE, 4)
                theirs.close()
                if len(fds) != 4:  # discarded before it was used
                    os._exit(0)
                spec_r, out_w, err_w, msg_w = fds
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.close(out_w)
                os.close(err_w)
                self.child_main(spec_r, msg_w)
            except BaseException:  # noqa: BLE001
                code = 70
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        theirs.close()
        self.children.add(pid)
        return pid, mine

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            try:
                self.sock.send(f"exit {pid} {status}".encode())
            except OSError:
                return


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this child if the fork server dies. The server kills its
    children when its client (the worker) goes, but a SIGKILL to the worker's whole
    process group kills the server at the same moment, and a block leads its own group,
    so nothing else would end it. (Processes the block started itself are not covered:
    they are re-parented, not killed, when the block dies this way.)"""
    if _prctl is None:  # not Linux: the server's own clean-up still applies
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the server died before the request took effect
        os._exit(0)


_prctl = libc_function("prctl")
_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    fd, run_path, own_path = int(argv[1]), argv[2], argv[3]
    # A stop signal to the worker's process group (systemd, honcho, Ctrl-C) reaches the
    # server too; the worker decides when its blocks end (runs.cluster), and the server
    # ends when the worker does (the end of its socket), killing what it forked.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if own_path == "-":
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = own_path[1:]
    module, _, name = run_path.partition(":")
    run = getattr(importlib.import_module(module), name)
    from pipelines.execution.child import child_main, server_prepare

    server_prepare(run)
    _Server(
        socket.socket(fileno=fd),
        lambda spec_fd, msg_fd: child_main(spec_fd, msg_fd, run),
    ).serve()

