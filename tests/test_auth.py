"""hostd.api.auth on its own: token files, digests, and who a header makes a call from."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from hostd.api.auth import (
    ADMIN,
    CredentialError,
    Credentials,
    PermissionDeniedError,
    Principal,
    UnauthenticatedError,
)


def _md(value: str) -> tuple[tuple[str, str], ...]:
    return (("user-agent", "test"), ("authorization", value))


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    return Credentials.open(tmp_path / "admin.token", tmp_path / "vm-tokens.json")


def test_the_admin_token_is_made_once_owner_only_and_read_back(tmp_path: Path) -> None:
    """The first open writes a 0600 file; the next open accepts the same token."""
    Credentials.open(tmp_path / "admin.token", None)
    token = (tmp_path / "admin.token").read_text().strip()
    assert 0o600 == stat.S_IMODE((tmp_path / "admin.token").stat().st_mode)
    again = Credentials.open(tmp_path / "admin.token", None)
    assert ADMIN == again.authenticate(_md(f"Bearer {token}"))


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """Group- or world-readable admin token: CredentialError naming the fix."""
    Credentials.open(tmp_path / "admin.token", None)
    (tmp_path / "admin.token").chmod(0o640)
    with pytest.raises(CredentialError, match="chmod 600"):
        Credentials.open(tmp_path / "admin.token", None)


@pytest.mark.parametrize(
    "value", ["", "Bearer", "Bearer ", "Basic abc", "Bearer tsv_unknown", "Bearer " + "x" * 500]
)
def test_missing_malformed_or_unknown_credentials_are_unauthenticated(
    creds: Credentials, value: str
) -> None:
    """Anything but a token this daemon issued is UNAUTHENTICATED, and the value is not echoed."""
    with pytest.raises(UnauthenticatedError) as caught:
        creds.authenticate(_md(value) if value else ())
    assert "tsv_unknown" not in str(caught.value) and "x" * 20 not in str(caught.value)


def test_a_vm_token_names_its_vm_and_is_scheme_case_insensitive(creds: Credentials) -> None:
    """RFC 6750: the scheme is case-insensitive; the principal is the token's VM."""
    token = creds.new_vm_token()
    creds.register_vm("vm1", token)
    assert Principal(admin=False, vm_id="vm1") == creds.authenticate(_md(f"bearer {token}"))


def test_a_vm_token_is_denied_other_vms_and_host_scoped_calls(creds: Credentials) -> None:
    """Its own VM passes; another VM or a host-scoped call is PERMISSION_DENIED."""
    token = creds.new_vm_token()
    creds.register_vm("vm1", token)
    principal = creds.authenticate(_md(f"Bearer {token}"))
    creds.require_vm(principal, "vm1", "GuestFault")
    with pytest.raises(PermissionDeniedError):
        creds.require_vm(principal, "vm2", "GuestFault")
    with pytest.raises(PermissionDeniedError):
        creds.require_admin(principal, "GetHost")


def test_only_digests_are_persisted_and_they_survive_a_reopen(tmp_path: Path) -> None:
    """vm-tokens.json (0600) holds SHA-256 digests; a reopened store accepts the token."""
    creds = Credentials.open(tmp_path / "admin.token", tmp_path / "vm-tokens.json")
    token = creds.new_vm_token()
    creds.register_vm("vm1", token)
    text = (tmp_path / "vm-tokens.json").read_text()
    assert token not in text
    assert {"vm1"} == set(json.loads(text)["vms"])
    assert 0o600 == stat.S_IMODE((tmp_path / "vm-tokens.json").stat().st_mode)
    reopened = Credentials.open(tmp_path / "admin.token", tmp_path / "vm-tokens.json")
    assert "vm1" == reopened.authenticate(_md(f"Bearer {token}")).vm_id


def test_a_revoked_or_replaced_token_is_unknown(creds: Credentials) -> None:
    """DestroyVm revokes, even a token that authenticated a moment ago: it may then only repeat
    a remembered call of its own (the servicer checks that), never act on a VM; a new VM of the
    same id gets a token of its own."""
    old = creds.new_vm_token()
    creds.register_vm("vm1", old)
    assert "vm1" == creds.authenticate(_md(f"Bearer {old}")).vm_id  # now remembered
    creds.revoke_vm("vm1")
    revoked = creds.authenticate(_md(f"Bearer {old}"))
    assert revoked.revoked
    with pytest.raises(UnauthenticatedError):
        creds.require_vm(revoked, "vm1", "GetVm")
    with pytest.raises(UnauthenticatedError):
        creds.require_admin(revoked, "GetHost")
    new = creds.new_vm_token()
    creds.register_vm("vm1", new)
    assert "vm1" == creds.authenticate(_md(f"Bearer {new}")).vm_id
    with pytest.raises(UnauthenticatedError):
        creds.require_vm(creds.authenticate(_md(f"Bearer {old}")), "vm1", "GetVm")


def test_a_vm_token_derived_from_a_request_id_is_the_same_on_a_retry(creds: Credentials) -> None:
    """A retried CreateVm (same request_id) answers the same token; another request, another
    token; without a request_id tokens are random."""
    assert creds.new_vm_token("vm1", "req-1") == creds.new_vm_token("vm1", "req-1")
    assert creds.new_vm_token("vm1", "req-1") != creds.new_vm_token("vm1", "req-2")
    assert creds.new_vm_token("vm1") != creds.new_vm_token("vm1")
