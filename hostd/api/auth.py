"""Who may call what: bearer tokens, checked against the admin token and the per-VM tokens.

A client sends ``authorization: Bearer <token>`` metadata (RFC 6750) with every call.

- The **admin token** is generated at the first start into ``admin.token`` (mode 0600) and is
  accepted for every call. It is meant for the host's management layer (the libvirt role).
- A **VM token** is made by ``CreateVm`` and returned once, in ``Vm.vm_token``. It is accepted for
  the calls that name that VM (faults, tags, devices, virtio-mem, GetVm, DestroyVm) and for
  nothing else; host-scoped calls (GetHost, ListVms, CreateVm, ExportState, CheckInvariants,
  WatchEvents) need the admin token.

Missing or unknown credential: UNAUTHENTICATED. A valid token used beyond its scope:
PERMISSION_DENIED; the call is refused before the model is touched, so nothing changes.

Only SHA-256 digests of tokens are kept, in memory and on disk (``vm-tokens.json``, rewritten
atomically on every change), so a copy of the state directory does not hold usable VM tokens.
Tokens are 256 random bits, so a fast hash is enough (there is nothing to brute-force); digests
are compared with :func:`hmac.compare_digest`. A token never appears in a log line, a metric, an
event or an error message: errors say which kind of credential was refused, not its value.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hostd.logs import kv

logger = logging.getLogger("hostd.auth")

ADMIN_TOKEN_FILE = "admin.token"
VM_TOKENS_FILE = "vm-tokens.json"
METADATA_KEY = "authorization"
_SCHEME = "bearer "
_ADMIN_PREFIX = "tsa_"
_VM_PREFIX = "tsv_"
# Revoked tokens remembered so that a destroyed VM's VMM can still retry its DestroyVm.
MAX_REVOKED_REMEMBERED = 1024
# A bearer value longer than this is not one of ours; refuse it before hashing.
MAX_TOKEN_CHARS = 128


class AuthError(Exception):
    """A call refused for its credential. ``reason`` is the ErrorInfo reason."""

    reason = "AUTH_ERROR"


class UnauthenticatedError(AuthError):
    """No credential, or one this daemon did not issue."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(AuthError):
    """A valid credential used beyond what it allows."""

    reason = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Principal:
    """Who a call comes from: the admin, or the holder of one VM's token."""

    admin: bool
    vm_id: str = ""
    # The token of a destroyed VM (revoked lately): it may only repeat a remembered call of its
    # own (an idempotent retry, AIP-155), never act on a VM.
    revoked: bool = False

    @property
    def name(self) -> str:
        """A label for logs and per-client limits; never the token."""
        return "admin" if self.admin else f"vm:{self.vm_id}"


ADMIN = Principal(admin=True)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, owner-only (0600) from the first byte on."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CredentialError(Exception):
    """The admin token file or the VM token file cannot be used (message names the path)."""


class Credentials:
    """The admin token's digest and every VM's token digest; the one place tokens are checked.

    :meth:`register_vm` and :meth:`revoke_vm` are called under the host lock (with the model
    call they belong to), :meth:`authenticate` on the event loop; they share only the cache of
    authenticated header values, guarded by its own lock.
    """

    def __init__(self, admin_digest: str, vm_tokens_path: Path | None) -> None:
        self._admin_digest = admin_digest
        self._vm_tokens_path = vm_tokens_path
        self._digest_of_vm: dict[str, str] = {}
        self._vm_of_digest: dict[str, str] = {}
        # Digests of tokens revoked lately, oldest first (memory only, bounded).
        self._revoked: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Header values that authenticated, so that the fault path hashes a token once, not per
        # call. Only successes are kept (its size is bounded by the tokens issued) and it is
        # emptied whenever a token is issued or revoked. A dict lookup compares a keyed string
        # hash (SipHash, secret per process) before it compares characters, so a wrong guess
        # never reaches a character compare and its timing says nothing about a valid token.
        self._authenticated: dict[str, Principal] = {}
        # Bumped on every change of the tokens: a check that raced with a revocation (on the
        # model thread) does not put its now stale answer in the cache.
        self._generation = 0
        self._cache_lock = threading.Lock()

    @classmethod
    def open(cls, admin_token_path: Path, vm_tokens_path: Path | None) -> Credentials:
        """Read the admin token (generating it at the first start) and the VM token digests.

        ``vm_tokens_path`` None: VM tokens live in memory only (a daemon without a state
        directory forgets its VMs at exit anyway). Raises :class:`CredentialError`.
        """
        admin_token_path = Path(admin_token_path)
        try:
            admin = cls._load_or_create_admin_token(admin_token_path)
        except OSError as e:
            raise CredentialError(f"admin token file {admin_token_path}: {e.strerror}") from None
        creds = cls(_digest(admin), vm_tokens_path)
        if vm_tokens_path is not None and vm_tokens_path.exists():
            try:
                doc = json.loads(vm_tokens_path.read_text())
                digests = dict(doc["vms"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CredentialError(f"VM token file {vm_tokens_path}: unreadable ({e})") from None
            for vm_id, digest in digests.items():
                creds._digest_of_vm[str(vm_id)] = str(digest)
                creds._vm_of_digest[str(digest)] = str(vm_id)
        return creds

    @staticmethod
    def _load_or_create_admin_token(path: Path) -> str:
        if path.exists():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise CredentialError(
                    f"admin token file {path} has mode {mode:04o}: others can read it; "
                    "chmod 600 it (or delete it to make a new token)"
                )
            token = path.read_text().strip()
            if not token.startswith(_ADMIN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
                raise CredentialError(f"admin token file {path}: not a hostd admin token")
            logger.info(kv("admin_token", path=path, created="false"))
            return token
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = _ADMIN_PREFIX + secrets.token_urlsafe(32)
        _write_private(path, (token + "\n").encode())
        logger.info(kv("admin_token", path=path, created="true"))
        return token

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of a call's ``authorization`` metadata (or UnauthenticatedError)."""
        value = ""
        for key, item in metadata or ():
            if key == METADATA_KEY:
                value = item if isinstance(item, str) else ""
                break
        cached = self._authenticated.get(value)
        if cached is not None:
            return cached
        if not value:
            raise UnauthenticatedError(
                "no credential: send 'authorization: Bearer <token>' metadata "
                "(the admin token file, or the vm_token CreateVm answered)"
            )
        if value[: len(_SCHEME)].lower() != _SCHEME or len(value) > len(_SCHEME) + MAX_TOKEN_CHARS:
            raise UnauthenticatedError("the authorization metadata is not 'Bearer <token>'")
        generation = self._generation
        principal = self._check(_digest(value[len(_SCHEME) :].strip()))
        with self._cache_lock:
            if generation == self._generation:
                self._authenticated[value] = principal
        return principal

    def _check(self, digest: str) -> Principal:
        if hmac.compare_digest(digest, self._admin_digest):
            return ADMIN
        # A dict lookup by digest is not constant-time in the digest, which is harmless: timing
        # could reveal a prefix of a SHA-256 digest, which says nothing about a token.
        vm_id = self._vm_of_digest.get(digest)
        if vm_id is None and digest in self._revoked:
            return Principal(admin=False, vm_id=self._revoked[digest], revoked=True)
        if vm_id is None or not hmac.compare_digest(self._digest_of_vm.get(vm_id, ""), digest):
            raise UnauthenticatedError("unknown token (not issued by this daemon, or revoked)")
        return Principal(admin=False, vm_id=vm_id)

    @staticmethod
    def require_admin(principal: Principal, what: str) -> None:
        """Refuse a VM token for a host-scoped call."""
        if principal.revoked:
            raise UnauthenticatedError("unknown token (not issued by this daemon, or revoked)")
        if not principal.admin:
            raise PermissionDeniedError(f"{what} needs the admin token; a VM token was sent")

    @staticmethod
    def require_vm(principal: Principal, vm_id: str, what: str) -> None:
        """Refuse a token that is neither the admin token nor the token of VM ``vm_id``."""
        if principal.revoked:
            raise UnauthenticatedError("unknown token (not issued by this daemon, or revoked)")
        if not principal.admin and principal.vm_id != vm_id:
            # The VM named in the request is not echoed: it may be anything a client sent.
            raise PermissionDeniedError(f"{what}: the token sent is another VM's token")

    def new_vm_token(self, vm_id: str = "", request_id: str = "") -> str:
        """A VM token (not yet valid: :meth:`register_vm` makes it so). With a ``request_id``
        it is derived from the request (keyed by the admin credential), so that a retried
        CreateVm answers the same token without any token being stored; otherwise random."""
        if not request_id:
            return _VM_PREFIX + secrets.token_urlsafe(32)
        mac = hmac.new(
            bytes.fromhex(self._admin_digest), f"{vm_id}\0{request_id}".encode(), hashlib.sha256
        )
        return _VM_PREFIX + base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def register_vm(self, vm_id: str, token: str) -> None:
        """Make ``token`` the one token of ``vm_id`` (durably, with a state directory). Raises
        OSError if it cannot be saved; a token left behind for a VM that was then not created
        is harmless (it can act on no VM, and the next VM of that id replaces it)."""
        digest = _digest(token)
        if self._digest_of_vm.get(vm_id) == digest:
            return
        self._forget(vm_id)
        self._revoked.pop(digest, None)
        self._digest_of_vm[vm_id] = digest
        self._vm_of_digest[digest] = vm_id
        self._invalidate()
        self._save()

    def revoke_vm(self, vm_id: str) -> None:
        """Forget the token of a destroyed VM: a later VM of the same id gets a new one. Saved
        as best it can: a revoked token left in the file can act on no VM."""
        if self._forget(vm_id):
            try:
                self._save()
            except OSError as e:
                logger.warning(kv("vm_tokens_save_failed", error=e.strerror))

    def _forget(self, vm_id: str) -> bool:
        digest = self._digest_of_vm.pop(vm_id, None)
        if digest is None:
            return False
        self._vm_of_digest.pop(digest, None)
        self._revoked[digest] = vm_id
        while len(self._revoked) > MAX_REVOKED_REMEMBERED:
            self._revoked.popitem(last=False)
        self._invalidate()
        return True

    def _invalidate(self) -> None:
        with self._cache_lock:
            self._generation += 1
            self._authenticated.clear()

    def _save(self) -> None:
        if self._vm_tokens_path is None:
            return
        doc = {"format": 1, "hash": "sha256", "vms": dict(sorted(self._digest_of_vm.items()))}
        _write_private(self._vm_tokens_path, json.dumps(doc, indent=1).encode())
