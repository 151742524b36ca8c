"""sluice/filters/auth.wasm through the abi host alone (tests/hosting.FilterRig)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import hosting
import pytest
from aiohttp import web
from hosting import metric_values, rh

from sluice import BUILTIN_FILTERS_DIR, abi

AUTH = BUILTIN_FILTERS_DIR / "auth.wasm"
SECRET = "s3cret-for-tests"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key_subject(text: str) -> str:
    return "key-" + sha(text)[:8]


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(
    claims: dict[str, Any],
    secret: str = SECRET,
    header: dict[str, Any] | None = None,
    signature: str | None = None,
) -> str:
    head = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    signing = f"{b64u(json.dumps(head).encode())}.{b64u(json.dumps(claims).encode())}"
    if signature is None:
        signature = b64u(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())
    return f"{signing}.{signature}"


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")




@pytest.fixture
def rig() -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig() as r:
        yield r


def load(rig: hosting.FilterRig, config: dict[str, Any], **kw: Any) -> Any:
    return rig.load(str(AUTH), config=config, name="auth", **kw)


def assert_401(ex: Any, reason: str) -> None:
    assert ex.local_reply is not None, "expected a local 401"
    assert ex.local_reply.status == 401
    assert ex.local_reply.body.decode() == reason
    assert ("www-authenticate", 'Bearer realm="sluice"') in [
        (k.lower(), v) for k, v in ex.local_reply.headers
    ]


# ------------------------------------------------------------------------------------------------
# API keys


def test_plain_api_key_allows_and_sets_subject(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1", "k2"]})
    ex = rig.request(plugin, headers=[("x-api-key", "k2")])
    assert ex.local_reply is None
    assert ex.request_headers.get("x-auth-subject") == key_subject("k2")
    assert ex.request_headers.get("x-api-key") == "k2"  # strip_credentials defaults to false
    assert rh(ex).get(":status") == "200"
    assert metric_values(plugin) == {"auth_allowed": 1, "auth_denied": 0}


def test_wrong_api_key_is_401(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1"]})
    ex = rig.request(plugin, headers=[("x-api-key", "k1x")])
    assert_401(ex, "invalid api key")
    assert metric_values(plugin) == {"auth_allowed": 0, "auth_denied": 1}


def test_missing_credentials_is_401(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1"]})
    assert_401(rig.request(plugin), "missing credentials")


def test_hashed_and_object_keys(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "api_keys": [
                "sha256:" + sha("hashed").upper(),
                {"key": "k2", "subject": "bob"},
                {"sha256": sha("k3"), "subject": "alice"},
                {"sha256": sha("k4")},
                {"key": "k5"},
            ]
        },
    )
    expected = {
        "hashed": key_subject("hashed"),
        "k2": "bob",
        "k3": "alice",
        "k4": key_subject("k4"),
        "k5": key_subject("k5"),
    }
    for key, subject in expected.items():
        ex = rig.request(plugin, headers=[("x-api-key", key)])
        assert ex.local_reply is None, key
        assert ex.request_headers.get("x-auth-subject") == subject
    # the hash itself is not a key
    assert_401(rig.request(plugin, headers=[("x-api-key", sha("k3"))]), "invalid api key")


def test_custom_api_key_header_and_subject_header(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1"], "api_key_header": "X-Token", "subject_header": "X-Who"})
    assert_401(rig.request(plugin, headers=[("x-api-key", "k1")]), "missing credentials")
    ex = rig.request(plugin, headers=[("x-token", "k1"), ("x-who", "admin"), ("x-who", "root")])
    assert ex.local_reply is None
    assert ex.request_headers.get_all("x-who") == [key_subject("k1")]
    assert "x-auth-subject" not in ex.request_headers


def test_client_subject_header_is_replaced(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": [{"key": "k1", "subject": "bob"}]})
    ex = rig.request(plugin, headers=[("x-auth-subject", "admin"), ("x-api-key", "k1")])
    assert ex.request_headers.get_all("x-auth-subject") == ["bob"]


def test_exempt_paths_skip_auth_but_drop_client_subject(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1"], "exempt_paths": ["/healthz", "/public/"]})
    for path in ("/healthz", "/healthz/deep?x=1", "/public/a"):
        ex = rig.request(plugin, path=path, headers=[("x-auth-subject", "admin")])
        assert ex.local_reply is None, path
        assert "x-auth-subject" not in ex.request_headers
    assert_401(rig.request(plugin, path="/public"), "missing credentials")
    assert_401(rig.request(plugin, path="/private?p=/healthz"), "missing credentials")
    assert metric_values(plugin) == {"auth_allowed": 0, "auth_denied": 2}


@pytest.mark.parametrize(
    "path",
    [
        "/healthz/../admin",
        "/healthz/./x",
        "/healthz/%2e%2e/admin",
        "/healthz%2F..%2Fadmin",
        "/healthz\\..",
        "/healthz%",
    ],
)
def test_exempt_prefix_does_not_cover_ambiguous_paths(rig: hosting.FilterRig, path: str) -> None:
    plugin = load(rig, {"api_keys": ["k1"], "exempt_paths": ["/healthz"]})
    assert_401(rig.request(plugin, path=path), "missing credentials")
    assert rig.request(plugin, path=path, headers=[("x-api-key", "k1")]).local_reply is None


def test_strip_credentials(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {"api_keys": ["k1"], "jwt": {"secret": SECRET}, "strip_credentials": True},
    )
    ex = rig.request(plugin, headers=[("x-api-key", "k1"), ("authorization", "Basic Zm9v")])
    assert ex.local_reply is None
    assert "x-api-key" not in ex.request_headers
    assert "authorization" not in ex.request_headers
    ex = rig.request(plugin, headers=[bearer(make_jwt({"sub": "carol"}))])
    assert ex.local_reply is None
    assert "authorization" not in ex.request_headers
    assert ex.request_headers.get("x-auth-subject") == "carol"


def test_allowed_subjects(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "api_keys": [{"key": "k1", "subject": "alice"}, {"key": "k2", "subject": "bob"}],
            "jwt": {"secret": SECRET},
            "allowed_subjects": ["alice", "carol"],
        },
    )
    assert rig.request(plugin, headers=[("x-api-key", "k1")]).local_reply is None
    ex = rig.request(plugin, headers=[("x-api-key", "k2")])
    assert ex.local_reply is not None and ex.local_reply.status == 403
    assert rig.request(plugin, headers=[bearer(make_jwt({"sub": "carol"}))]).local_reply is None
    ex = rig.request(plugin, headers=[bearer(make_jwt({"sub": "dave"}))])
    assert ex.local_reply is not None and ex.local_reply.status == 403
    ex = rig.request(plugin, headers=[bearer(make_jwt({"scope": "x"}))])  # no sub: unknown subject
    assert ex.local_reply is not None and ex.local_reply.status == 403
    assert metric_values(plugin) == {"auth_allowed": 2, "auth_denied": 3}


def test_api_key_header_decides_before_jwt(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"api_keys": ["k1"], "jwt": {"secret": SECRET}})
    ex = rig.request(plugin, headers=[("x-api-key", "bad"), bearer(make_jwt({"sub": "carol"}))])
    assert_401(ex, "invalid api key")
    ex = rig.request(plugin, headers=[("x-api-key", "k1"), bearer(make_jwt({"sub": "carol"}))])
    assert ex.request_headers.get("x-auth-subject") == key_subject("k1")


# ------------------------------------------------------------------------------------------------
# JWT


@pytest.fixture
def jwt_plugin(rig: hosting.FilterRig) -> Any:
    return load(
        rig,
        {
            "jwt": {
                "secret": SECRET,
                "algorithms": ["HS256"],
                "issuer": "https://issuer.example",
                "audience": "sluice",
                "leeway_s": 30,
            }
        },
    )


def good_claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "alice",
        "iss": "https://issuer.example",
        "aud": "sluice",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_jwt_valid(rig: hosting.FilterRig, jwt_plugin: Any) -> None:
    ex = rig.request(jwt_plugin, headers=[bearer(make_jwt(good_claims()))])
    assert ex.local_reply is None
    assert ex.request_headers.get("x-auth-subject") == "alice"
    # scheme is case-insensitive, aud may be an array
    ex = rig.request(
        jwt_plugin,
        headers=[("authorization", "bearer " + make_jwt(good_claims(aud=["other", "sluice"])))],
    )
    assert ex.local_reply is None
    # claims without exp/nbf are accepted
    ex = rig.request(jwt_plugin, headers=[bearer(make_jwt(good_claims(exp=None, nbf=None)))])
    assert ex.local_reply is None


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -60}, "expired"),
        ({"exp": -20}, None),  # within the 30 s leeway
        ({"nbf": 120}, "not yet valid"),
        ({"nbf": 20}, None),  # within the leeway
        ({"iss": "https://evil.example"}, "bad issuer"),
        ({"iss": None}, "bad issuer"),
        ({"aud": "other"}, "bad audience"),
        ({"aud": ["a", "b"]}, "bad audience"),
        ({"aud": None}, "bad audience"),
        ({"exp": "tomorrow"}, "malformed exp"),
    ],
)
def test_jwt_claims(
    rig: hosting.FilterRig, jwt_plugin: Any, claims: dict[str, Any], reason: str | None
) -> None:
    now = int(time.time())
    over = {k: (now + v if k in ("exp", "nbf") and isinstance(v, int) else v) for k, v in claims.items()}
    ex = rig.request(jwt_plugin, headers=[bearer(make_jwt(good_claims(**over)))])
    if reason is None:
        assert ex.local_reply is None
    else:
        assert_401(ex, f"invalid token: {reason}")


def test_jwt_bad_signature(rig: hosting.FilterRig, jwt_plugin: Any) -> None:
    token = make_jwt(good_claims(), secret="wrong")
    assert_401(rig.request(jwt_plugin, headers=[bearer(token)]), "invalid token: bad signature")
    # payload tampered after signing
    head, _, sig = make_jwt(good_claims()).split(".")
    forged = f"{head}.{b64u(json.dumps(good_claims(sub='admin')).encode())}.{sig}"
    assert_401(rig.request(jwt_plugin, headers=[bearer(forged)]), "invalid token: bad signature")
    assert_401(rig.request(jwt_plugin, headers=[bearer(head + ".e30.")]), "invalid token: bad signature")


def test_jwt_alg_none_and_wrong_alg(rig: hosting.FilterRig, jwt_plugin: Any) -> None:
    none = make_jwt(good_claims(), header={"alg": "none", "typ": "JWT"}, signature="")
    assert_401(rig.request(jwt_plugin, headers=[bearer(none)]), "invalid token: alg none not allowed")
    none2 = make_jwt(good_claims(), header={"alg": "None"})
    assert_401(rig.request(jwt_plugin, headers=[bearer(none2)]), "invalid token: alg none not allowed")
    hs512 = make_jwt(good_claims(), header={"alg": "HS512", "typ": "JWT"})
    assert_401(rig.request(jwt_plugin, headers=[bearer(hs512)]), "invalid token: algorithm not allowed")
    rs = make_jwt(good_claims(), header={"alg": "RS256"})
    assert_401(rig.request(jwt_plugin, headers=[bearer(rs)]), "invalid token: algorithm not allowed")
    noalg = make_jwt(good_claims(), header={"typ": "JWT"})
    assert_401(rig.request(jwt_plugin, headers=[bearer(noalg)]), "invalid token: missing alg")


@pytest.mark.parametrize("token", ["abc", "a.b", "a.b.c.d", "!!!.e30.x", ".e30.x"])
def test_jwt_malformed(rig: hosting.FilterRig, jwt_plugin: Any, token: str) -> None:
    ex = rig.request(jwt_plugin, headers=[bearer(token)])
    assert ex.local_reply is not None and ex.local_reply.status == 401
    assert ex.local_reply.body.startswith(b"invalid token: ")


def test_jwt_scheme_and_missing(rig: hosting.FilterRig, jwt_plugin: Any) -> None:
    assert_401(rig.request(jwt_plugin), "missing credentials")
    assert_401(rig.request(jwt_plugin, headers=[("authorization", "Basic YTpi")]), "missing credentials")
    # an api key header is ignored when no api keys are configured
    assert_401(rig.request(jwt_plugin, headers=[("x-api-key", "k1")]), "missing credentials")


def test_jwt_exp_boundary_without_leeway(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"jwt": {"secret": SECRET, "leeway_s": 0}})
    now = int(time.time())
    assert_401(rig.request(plugin, headers=[bearer(make_jwt({"exp": now}))]), "invalid token: expired")
    assert rig.request(plugin, headers=[bearer(make_jwt({"exp": now + 5}))]).local_reply is None
    assert_401(
        rig.request(plugin, headers=[bearer(make_jwt({"nbf": now + 5}))]), "invalid token: not yet valid"
    )


def test_jwt_default_leeway_and_no_iss_aud_checks(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"jwt": {"secret": SECRET}})
    now = int(time.time())
    ok = make_jwt({"sub": "x", "iss": "anyone", "aud": "anything", "exp": now - 10})
    assert rig.request(plugin, headers=[bearer(ok)]).local_reply is None
    expired = make_jwt({"sub": "x", "exp": now - 100})
    assert_401(rig.request(plugin, headers=[bearer(expired)]), "invalid token: expired")
    strict = load(rig, {"jwt": {"secret": SECRET, "leeway_s": 0}})
    assert_401(rig.request(strict, headers=[bearer(make_jwt({"exp": now - 2}))]), "invalid token: expired")


# ------------------------------------------------------------------------------------------------
# ext_authz against a real aiohttp server


class AuthzServer:
    """An aiohttp authorization service on its own loop/thread: 200 for x-api-key 'good',
    `status` header value otherwise (default 403); `/slow` never answers in time."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "host": request.host,
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )
        if request.path == "/slow":
            await asyncio.sleep(5)
        if (
            request.headers.get("x-api-key") == "good"
            or request.headers.get("authorization") == "Bearer good"
        ):
            return web.Response(status=200, text="ok")
        return web.Response(status=int(request.headers.get("x-want-status", "403")), text="no")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = int(self._runner.addresses[0][1])
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self) -> AuthzServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def authz() -> Iterator[AuthzServer]:
    with AuthzServer() as server:
        yield server


@pytest.fixture
def authz_rig(authz: AuthzServer) -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig(
        clusters={"authz": f"127.0.0.1:{authz.port}", "dead": f"127.0.0.1:{free_port()}"}
    ) as r:
        yield r


def test_ext_authz_only(authz_rig: hosting.FilterRig, authz: AuthzServer) -> None:
    plugin = load(authz_rig, {"ext_authz": {"cluster": "authz"}})
    ex = authz_rig.request(
        plugin,
        path="/orders?id=1",
        headers=[("x-api-key", "good"), ("x-other", "nope"), ("x-auth-subject", "admin")],
    )
    assert ex.local_reply is None
    assert rh(ex).get(":status") == "200"
    assert "x-auth-subject" not in ex.request_headers  # no subject known: client value dropped
    call = authz.seen[-1]
    assert call["method"] == "GET"
    assert call["path"] == "/check"
    assert call["host"] == "authz"  # :authority = cluster name
    assert call["headers"].get("x-api-key") == "good"
    assert "x-other" not in call["headers"]
    ex = authz_rig.request(plugin, headers=[("x-api-key", "bad")])
    assert ex.local_reply is not None and ex.local_reply.status == 403
    ex = authz_rig.request(plugin, headers=[("authorization", "Bearer x"), ("x-want-status", "418")])
    # x-want-status is not forwarded (not in ext_authz.headers): the service answers 403
    assert ex.local_reply is not None and ex.local_reply.status == 403
    assert "authorization" in authz.seen[-1]["headers"]
    assert metric_values(plugin) == {"auth_allowed": 1, "auth_denied": 2}


def test_ext_authz_status_passthrough_and_headers_option(
    authz_rig: hosting.FilterRig, authz: AuthzServer
) -> None:
    plugin = load(
        authz_rig,
        {
            "ext_authz": {
                "cluster": "authz",
                "path": "/v1/authorize",
                "headers": ["X-Want-Status"],
                "timeout_ms": 2000,
            }
        },
    )
    ex = authz_rig.request(plugin, headers=[("x-want-status", "429"), ("x-api-key", "good")])
    assert ex.local_reply is not None and ex.local_reply.status == 429
    seen = authz.seen[-1]
    assert seen["path"] == "/v1/authorize"
    assert "x-api-key" not in seen["headers"]
    ex = authz_rig.request(plugin, headers=[("x-want-status", "401")])
    assert ex.local_reply is not None and ex.local_reply.status == 401


def test_ext_authz_after_local_checks(authz_rig: hosting.FilterRig, authz: AuthzServer) -> None:
    plugin = load(
        authz_rig,
        {"api_keys": [{"key": "good", "subject": "svc"}, "other"], "ext_authz": {"cluster": "authz"}},
    )
    ex = authz_rig.request(plugin, headers=[("x-api-key", "good")])
    assert ex.local_reply is None
    assert ex.request_headers.get("x-auth-subject") == "svc"
    n = len(authz.seen)
    ex = authz_rig.request(plugin, headers=[("x-api-key", "wrong")])
    assert_401(ex, "invalid api key")
    assert len(authz.seen) == n  # rejected locally: no callout
    ex = authz_rig.request(plugin, headers=[("x-api-key", "other")])  # local ok, service says no
    assert ex.local_reply is not None and ex.local_reply.status == 403
    assert len(authz.seen) == n + 1


def test_ext_authz_failures_are_503(authz_rig: hosting.FilterRig, authz: AuthzServer) -> None:
    dead = load(authz_rig, {"ext_authz": {"cluster": "dead"}})
    ex = authz_rig.request(dead, headers=[("x-api-key", "good")], wait=5.0)
    assert ex.local_reply is not None and ex.local_reply.status == 503
    slow = load(authz_rig, {"ext_authz": {"cluster": "authz", "path": "/slow", "timeout_ms": 200}})
    ex = authz_rig.request(slow, headers=[("x-api-key", "good")], wait=5.0)
    assert ex.local_reply is not None and ex.local_reply.status == 503
    unknown = load(authz_rig, {"ext_authz": {"cluster": "nowhere"}})
    ex = authz_rig.request(unknown, headers=[("x-api-key", "good")])
    assert ex.local_reply is not None and ex.local_reply.status == 503
    assert metric_values(dead)["auth_denied"] == 1


def test_ext_authz_keeps_jwt_subject_across_the_callout(
    authz_rig: hosting.FilterRig, authz: AuthzServer
) -> None:
    plugin = load(authz_rig, {"jwt": {"secret": SECRET}, "ext_authz": {"cluster": "authz"}})
    subject = "user:" + "x" * 600
    token = make_jwt({"sub": subject})
    ex = authz_rig.request(plugin, headers=[bearer(token), ("x-api-key", "good")])
    assert ex.local_reply is None
    assert ex.request_headers.get_all("x-auth-subject") == [subject]
    assert authz.seen[-1]["headers"]["authorization"] == f"Bearer {token}"
    ex = authz_rig.request(
        plugin, headers=[bearer(make_jwt({"sub": "a"}, secret="bad")), ("x-api-key", "good")]
    )
    assert_401(ex, "invalid token: bad signature")


# ------------------------------------------------------------------------------------------------
# Bad configuration


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "no authentication method configured"),
        ({"api_keys": ["k1"], "apikeys": []}, 'unknown key "apikeys"'),
        ({"api_keys": "k1"}, "api_keys must be a JSON array"),
        ({"api_keys": [""]}, "api_keys[0] must not be empty"),
        ({"api_keys": ["k", "sha256:abc"]}, "api_keys[1]: sha256 must be 64 hex digits"),
        ({"api_keys": [{"key": "a", "sha256": sha("a")}]}, 'exactly one of "key" and "sha256"'),
        ({"api_keys": [{"key": "a", "role": "x"}]}, 'unknown key "role" in api_keys[0]'),
        ({"api_keys": [7]}, "api_keys[0] must be a string or an object"),
        ({"jwt": {}}, "jwt.secret is required"),
        ({"jwt": {"secret": "s", "algorithms": ["RS256"]}}, 'unsupported algorithm "RS256"'),
        ({"jwt": {"secret": "s", "algorithms": []}}, "jwt.algorithms must not be empty"),
        ({"jwt": {"secret": "s", "leeway": 3}}, 'unknown key "leeway" in jwt'),
        ({"jwt": {"secret": "s", "leeway_s": -1}}, "jwt.leeway_s must be a non-negative integer"),
        ({"ext_authz": {"path": "/x"}}, "ext_authz.cluster is required"),
        ({"ext_authz": {"cluster": "a", "path": "x"}}, "ext_authz.path must start with /"),
        ({"ext_authz": {"cluster": "a", "timeout_ms": 0}}, "ext_authz.timeout_ms must be positive"),
        ({"api_keys": ["k"], "strip_credentials": "yes"}, "strip_credentials must be true or false"),
        ({"api_keys": ["k"], "exempt_paths": [1]}, "exempt_paths[0] must be a string"),
        ({"api_keys": ["k"], "allowed_subjects": "alice"}, "allowed_subjects must be a JSON array"),
    ],
)
def test_bad_config_fails_load(rig: hosting.FilterRig, config: dict[str, Any], problem: str) -> None:
    with pytest.raises(abi.PluginLoadError):
        load(rig, config)
    errors = [
        m
        for (name, level, m) in rig.logs
        if level == abi.LogLevel.ERROR and "auth: invalid configuration" in m
    ]
    assert errors, rig.logs
    assert problem in errors[-1]


def test_not_json_fails_load(rig: hosting.FilterRig) -> None:
    with pytest.raises(abi.PluginLoadError):
        rig.load(str(AUTH), config=b'{"api_keys": [', name="auth")
    assert any(
        level == abi.LogLevel.ERROR and "auth: invalid configuration: not valid JSON" in m
        for (_, level, m) in rig.logs
    )
