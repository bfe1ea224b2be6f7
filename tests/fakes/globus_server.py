"""FakeGlobusServer: a stand-in for Globus Auth and Globus Groups, which cannot be reached from here.

It listens on 127.0.0.1 and answers the endpoints FIRST uses, with the response shapes documented at
docs.globus.org (Auth API reference, Groups API reference). The project's code talks to it through the
real ``globus-sdk`` clients, pointed here by their ``base_url``; nothing of the project is patched.

- ``POST /v2/oauth2/token/introspect``  (confidential client, HTTP Basic)
- ``POST /v2/oauth2/token``  grants: dependent_token, authorization_code (PKCE), refresh_token
- ``POST /v2/oauth2/token/revoke``
- ``GET  /v2/groups/my_groups``  (Bearer: a Groups token from the dependent-token grant)

``approve(authorize_url, ...)`` plays the user's browser: it reads the PKCE challenge from the URL that
``first login`` prints and returns the code the user would paste back.

Failure modes for tests: ``mode = "error500"`` (every call answers 500) or ``mode = "hang"`` (every call
sleeps ``hang_s`` first). ``calls`` counts requests per endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

GROUPS_RS = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"


@dataclass
class FakeIdentity:
    username: str  # e.g. "alice@uchicago.edu"; the part after "@" is the identity provider's domain
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = ""

    @property
    def domain(self) -> str:
        return self.username.rpartition("@")[2]

    def detail(self) -> dict[str, Any]:
        return {
            "sub": self.id, "id": self.id, "username": self.username, "name": self.name or self.username,
            "email": self.username if not self.domain.startswith("clients.") else None,
            "identity_provider": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.domain)),
            "identity_provider_display_name": self.domain, "organization": self.domain, "status": "used",
            "identity_type": "client" if self.domain == "clients.auth.globus.org" else "login",
        }  # fmt: skip


@dataclass
class FakeToken:
    """What Auth knows about one access token."""

    identity: FakeIdentity
    client_id: str  # the client the token was issued to
    aud: list[str]
    scope: str
    exp: int
    linked: list[FakeIdentity] = field(default_factory=list)  # other identities in the identity set
    session_ids: list[str] | None = None  # identities authenticated in this session (default: the primary)
    policies: dict[str, bool] = field(default_factory=dict)  # policy id -> evaluation result
    groups: list[dict[str, str]] = field(default_factory=list)  # [{"id", "name"}]
    active: bool = True

    def introspection(self, include: set[str], policy_ids: list[str]) -> dict[str, Any]:
        if not self.active:
            return {"active": False}
        identities = [self.identity, *self.linked]
        doc: dict[str, Any] = {
            "active": True, "scope": self.scope, "client_id": self.client_id, "sub": self.identity.id,
            "username": self.identity.username, "name": self.identity.name or self.identity.username,
            "email": self.identity.detail()["email"], "aud": self.aud, "iss": "https://auth.globus.org",
            "exp": self.exp, "iat": self.exp - 3600, "nbf": self.exp - 3600, "token_type": "Bearer",
            "identity_set": [i.id for i in identities],
        }  # fmt: skip
        if "identity_set_detail" in include:
            doc["identity_set_detail"] = [i.detail() for i in identities]
        if "session_info" in include:
            ids = self.session_ids if self.session_ids is not None else [self.identity.id]
            doc["session_info"] = {
                "session_id": str(uuid.uuid4()),
                "authentications": {
                    i: {"idp": next((x.detail()["identity_provider"] for x in identities if x.id == i), None),
                        "auth_time": self.exp - 3000, "acr": None, "amr": None, "custom_claims": {}}
                    for i in ids
                },
            }  # fmt: skip
        if policy_ids:
            doc["policy_evaluations"] = {
                p: {"id": p, "evaluation": bool(self.policies.get(p, False)), "includes_high_assurance": True}
                for p in policy_ids
            }
        return doc


class FakeGlobusServer:
    """Globus Auth + Groups on 127.0.0.1 (see the module docstring). Use as a context manager."""

    def __init__(self, client_id: str | None = None, client_secret: str | None = None) -> None:
        self.client_id = client_id or str(uuid.uuid4())  # the gateway's confidential client (resource server)
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.scope = f"https://auth.globus.org/scopes/{self.client_id}/action_all"
        self.tokens: dict[str, FakeToken] = {}
        self.groups_tokens: dict[str, FakeToken] = {}  # dependent Groups token -> the user's token
        self.refresh_tokens: dict[str, FakeToken] = {}
        self.codes: dict[str, tuple[str, str, FakeToken]] = {}  # code -> (challenge, client_id, template)
        self.revoked: list[str] = []
        self.calls: Counter[str] = Counter()
        self.mode = "ok"  # "ok" | "error500" | "hang"
        self.hang_s = 5.0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeGlobusServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- making tokens ----

    def user_token(
        self,
        username: str = "alice@uchicago.edu",
        *,
        groups: list[str] | None = None,
        expires_in: int = 3600,
        aud: list[str] | None = None,
        scope: str | None = None,
        policies: dict[str, bool] | None = None,
        linked: list[str] | None = None,
        session: list[str] | None = None,
        active: bool = True,
        identity: FakeIdentity | None = None,
    ) -> str:
        """Register an access token for the gateway's scope and return it.

        ``groups`` are group names (their ids are derived from the name: ``group_id(name)``). ``linked`` adds
        identities to the identity set; ``session`` names the usernames authenticated in this session."""
        ident = identity or FakeIdentity(username)
        linked_ids = [FakeIdentity(u) for u in linked or []]
        session_ids = None
        if session is not None:
            by_name = {i.username: i.id for i in [ident, *linked_ids]}
            session_ids = [by_name[u] for u in session]
        tok = FakeToken(
            identity=ident, client_id=str(uuid.uuid4()), aud=aud if aud is not None else [self.client_id],
            scope=scope if scope is not None else self.scope, exp=int(time.time()) + expires_in,
            linked=linked_ids, session_ids=session_ids, policies=dict(policies or {}),
            groups=[{"id": self.group_id(g), "name": g} for g in groups or []], active=active,
        )  # fmt: skip
        return self._issue(tok)

    def service_token(self, client_id: str | None = None, *, groups: list[str] | None = None) -> tuple[str, str]:
        """A client-credentials token of a service account (a client identity). Returns (token, client id)."""
        cid = client_id or str(uuid.uuid4())
        ident = FakeIdentity(f"{cid}@clients.auth.globus.org", id=cid)
        tok = FakeToken(
            identity=ident, client_id=cid, aud=[self.client_id], scope=self.scope, exp=int(time.time()) + 172800,
            session_ids=[], groups=[{"id": self.group_id(g), "name": g} for g in groups or []],
        )  # fmt: skip
        return self._issue(tok), cid

    @staticmethod
    def group_id(name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"group:{name}"))

    def _issue(self, tok: FakeToken) -> str:
        token = "Ag" + secrets.token_urlsafe(40)
        with self._lock:
            self.tokens[token] = tok
        return token

    def approve(self, authorize_url: str, username: str = "alice@uchicago.edu", **token_kw: Any) -> str:
        """Play the browser: the user signs in at ``authorize_url`` and is shown a code to paste back."""
        q = {k: v[0] for k, v in parse_qs(urlparse(authorize_url).query).items()}
        assert q.get("code_challenge_method") == "S256", q
        assert q.get("response_type") == "code", q
        template = self.tokens.pop(self.user_token(username, **token_kw))
        code = secrets.token_urlsafe(16)
        self.codes[code] = (q["code_challenge"], q["client_id"], template)
        return code

    # ---- the HTTP side ----

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _form(self) -> dict[str, str]:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                return {k: v[0] for k, v in parse_qs(raw).items()}

            def _basic_ok(self) -> bool:
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Basic "):
                    return False
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                return cid == fake.client_id and secret == fake.client_secret

            def _gate(self, name: str) -> bool:
                fake.calls[name] += 1
                if fake.mode == "hang":
                    time.sleep(fake.hang_s)
                if fake.mode == "error500":
                    self._send(500, {"error": "internal_error", "errors": [{"status": "500", "code": "Error"}]})
                    return False
                return True

            def do_POST(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                form = self._form()
                if url.path == "/v2/oauth2/token/introspect":
                    if not self._gate("introspect"):
                        return
                    if not self._basic_ok():
                        return self._send(401, {"error": "invalid_client"})
                    tok = fake.tokens.get(form.get("token", ""))
                    include = set((form.get("include") or query.get("include") or "").split(","))
                    raw = form.get("authentication_policies") or query.get("authentication_policies") or ""
                    policy_ids = [p for p in raw.split(",") if p]
                    return self._send(200, tok.introspection(include, policy_ids) if tok else {"active": False})
                if url.path == "/v2/oauth2/token/revoke":
                    if not self._gate("revoke"):
                        return
                    token = form.get("token", "")
                    fake.revoked.append(token)
                    if token in fake.tokens:
                        fake.tokens[token].active = False
                    fake.refresh_tokens.pop(token, None)
                    return self._send(200, {"active": False})
                if url.path == "/v2/oauth2/token":
                    grant = form.get("grant_type", "")
                    if not self._gate(grant.rpartition(":")[2] or "token"):
                        return
                    return self._token_grant(grant, form)
                self._send(404, {"error": "not_found", "path": url.path})

            def _token_grant(self, grant: str, form: dict[str, str]) -> None:
                if grant == "urn:globus:auth:grant_type:dependent_token":
                    if not self._basic_ok():
                        return self._send(401, {"error": "invalid_client"})
                    tok = fake.tokens.get(form.get("token", ""))
                    if tok is None or not tok.active or fake.client_id not in tok.aud:
                        return self._send(400, {"error": "invalid_grant"})
                    groups_token = "Gr" + secrets.token_urlsafe(24)
                    fake.groups_tokens[groups_token] = tok
                    return self._send(200, [{
                        "access_token": groups_token, "resource_server": GROUPS_RS, "scope": GROUPS_SCOPE,
                        "expires_in": 172800, "token_type": "Bearer",
                    }])  # fmt: skip
                if grant == "authorization_code":
                    entry = fake.codes.pop(form.get("code", ""), None)
                    if entry is None:
                        return self._send(400, {"error": "invalid_grant"})
                    challenge, client_id, template = entry
                    verifier = form.get("code_verifier", "")
                    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
                    if digest.decode() != challenge or form.get("client_id") != client_id:
                        return self._send(400, {"error": "invalid_grant", "error_description": "PKCE failed"})
                    return self._send(200, self._new_tokens(template, client_id))
                if grant == "refresh_token":
                    template = fake.refresh_tokens.get(form.get("refresh_token", ""))
                    if template is None:
                        return self._send(400, {"error": "invalid_grant"})
                    doc = self._new_tokens(template, form.get("client_id", ""))
                    doc.pop("refresh_token")  # Globus keeps the same refresh token
                    doc["refresh_token"] = form["refresh_token"]
                    return self._send(200, doc)
                self._send(400, {"error": "unsupported_grant_type"})

            def _new_tokens(self, template: FakeToken, client_id: str) -> dict[str, Any]:
                tok = FakeToken(**{**template.__dict__, "client_id": client_id, "active": True})
                tok.exp = int(time.time()) + (template.exp - int(time.time()) if template.exp > time.time() else 3600)
                access = fake._issue(tok)
                refresh = "Rf" + secrets.token_urlsafe(32)
                fake.refresh_tokens[refresh] = template
                return {
                    "access_token": access, "expires_in": tok.exp - int(time.time()), "resource_server": fake.client_id,
                    "scope": fake.scope, "token_type": "Bearer", "refresh_token": refresh, "state": "_default",
                    "other_tokens": [],
                }  # fmt: skip

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == "/v2/groups/my_groups":
                    if not self._gate("my_groups"):
                        return
                    auth = self.headers.get("Authorization", "")
                    tok = fake.groups_tokens.get(auth.removeprefix("Bearer "))
                    if tok is None:
                        return self._send(401, {"code": "AUTHENTICATION_ERROR", "detail": "bad token"})
                    return self._send(200, [{
                        "id": g["id"], "name": g["name"], "description": "", "group_type": "regular",
                        "enforce_session": False, "parent_id": None,
                        "my_memberships": [{"group_id": g["id"], "identity_id": tok.identity.id,
                                            "username": tok.identity.username, "role": "member",
                                            "status": "active"}],
                    } for g in tok.groups])  # fmt: skip
                self._send(404, {"error": "not_found", "path": url.path})

        return Handler
