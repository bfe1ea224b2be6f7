"""Globus Auth settings for the gateway: a Prefect Block operators edit in the UI (the secret stays masked).

The authenticator holds a loaded copy, so no request waits on a block load; building one needs no Prefect
server (tests construct it directly).
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

SERVICE_ACCOUNT_DOMAIN = "clients.auth.globus.org"


class GlobusAuthBlock(Block):
    """Globus Auth for the FIRST gateway: its client, and who may call it."""

    _block_type_name = "FIRST Globus Auth"
    _block_type_slug = "first-globus-auth"
    _description = (
        "The gateway's Globus Auth client and caller policy: allowed identity-provider domains, required "
        "authentication policies and groups, admin groups and service accounts. The gateway re-reads it "
        "every minute."
    )

    client_id: str = Field(description="The gateway's confidential client id (its resource server)")
    client_secret: SecretStr = Field(description="The confidential client's secret")
    scope: str | None = Field(
        default=None,
        description="Scope a caller's token must carry (default: https://auth.globus.org/scopes/<client_id>/action_all)",
    )
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Identity-provider domains a caller must have signed in with (e.g. anl.gov); empty: any",
    )
    policies: list[str] = Field(
        default_factory=list, description="Globus authentication policy ids that every caller's session must pass"
    )
    required_groups: list[str] = Field(
        default_factory=list, description="Group ids; a caller must be in at least one to use the gateway at all"
    )
    admin_groups: list[str] = Field(
        default_factory=list, description="Group ids whose members are gateway admins (see everyone's status, usage)"
    )
    service_accounts: list[str] = Field(
        default_factory=list,
        description="Client ids allowed to call with client-credentials tokens (no identity provider, no session)",
    )
    native_client_id: str | None = Field(
        default=None, description="The native app client id that callers use with `first login` (published)"
    )
    cache_ttl_s: float = Field(default=300.0, gt=0, description="Upper bound on caching a valid token's check")
    negative_cache_ttl_s: float = Field(default=10.0, ge=0, description="How long a rejected token stays rejected")
    timeout_s: float = Field(default=5.0, gt=0, description="Bound on checking a new token with Globus (then 503)")
    auth_base_url: str | None = Field(default=None, description="Globus Auth URL (default: the SDK's own)")
    groups_base_url: str | None = Field(default=None, description="Globus Groups URL (default: the SDK's own)")

    @property
    def required_scope(self) -> str:
        return self.scope or f"https://auth.globus.org/scopes/{self.client_id}/action_all"
