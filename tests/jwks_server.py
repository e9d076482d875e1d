"""An identity provider for tests: a JWKS over real HTTP, and a signer of its tokens.

`JwksServer` serves `{"keys": [...]}` at `/jwks.json` from a thread of the test
process (`http.server`, a real socket on 127.0.0.1), counts the fetches, and can
rotate keys, answer an error status, serve a broken body or stall. `TokenFactory`
signs tokens with good claims by default; keyword arguments override or (with
None) remove claims, and helpers forge the tokens a verifier must refuse.

    key = new_rsa_key("key-1")
    with JwksServer(key) as idp:
        tokens = TokenFactory(key, issuer=ISSUER, audience=AUDIENCE)
        token = tokens.token(scope="queue:read", exp=int(time.time()) - 60)
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

JWKS_PATH = "/jwks.json"
STALL_LIMIT_S = 30.0  # a stalled request answers after this long, whatever happens


@dataclass(frozen=True)
class SigningKey:
    """A provider's private key, the kid it publishes it under and the alg it signs with."""

    kid: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str

    def public_jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        """The public key as a JWK (kty, kid, use "sig", and alg unless `with_alg` is False)."""
        public_key = self.private_key.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        jwk |= {"kid": self.kid, "use": "sig"}
        if with_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo): what alg-confusion attacks use."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_rsa_key(kid: str) -> SigningKey:
    """A fresh 2048-bit RSA key that signs RS256."""
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def new_ec_key(kid: str) -> SigningKey:
    """A fresh P-256 key that signs ES256."""
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a stalled request leaves a broken pipe: expected.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class JwksServer:
    """Serves a JWKS at `url` from a thread until `stop()`; a context manager.

    Published keys are `SigningKey`s or raw JWK dicts. `status` (default 200) and
    `body` (default the JWKS) change the answer; `stall()` holds every request
    until `release()` or `stop()`.
    """

    def __init__(self, *keys: SigningKey | dict[str, Any]) -> None:
        self.status = 200
        self.body: bytes | None = None  # served instead of the JWKS when set
        self._jwks: list[dict[str, Any]] = []
        self._fetches = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self.publish(*keys)
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: stop() waits for one, and every test stops a server.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        """The port the server listens on (chosen by the OS)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The JWKS's URL, `http://127.0.0.1:PORT/jwks.json`."""
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    @property
    def fetches(self) -> int:
        """How many GET requests for the JWKS have arrived (stalled ones included)."""
        with self._lock:
            return self._fetches

    def publish(self, *keys: SigningKey | dict[str, Any]) -> None:
        """Serve exactly these keys from now on."""
        jwks = [key.public_jwk() if isinstance(key, SigningKey) else key for key in keys]
        with self._lock:
            self._jwks = jwks

    def rotate(self, kid: str, *, keep_old: bool = True) -> SigningKey:
        """Publish a new RSA key under `kid` before the old keys (instead, unless `keep_old`)."""
        key = new_rsa_key(kid)
        with self._lock:
            self._jwks = [key.public_jwk(), *(self._jwks if keep_old else [])]
        return key

    def stall(self) -> None:
        """Hold every request, unanswered, until `release()` or `stop()`."""
        self._released.clear()

    def release(self) -> None:
        """Answer the stalled requests, and answer new ones at once."""
        self._released.set()

    def start(self) -> None:
        """Start serving (the socket already listens from construction on)."""
        self._thread.start()

    def stop(self) -> None:
        """Release stalled requests, stop serving and close the socket."""
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _answer(self, path: str) -> tuple[int, bytes]:
        if path != JWKS_PATH:
            return 404, b'{"error": "not found"}'
        with self._lock:
            self._fetches += 1
            body = self.body if self.body is not None else json.dumps({"keys": self._jwks}).encode()
            status = self.status
        self._released.wait(STALL_LIMIT_S)
        return status, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        answer = self._answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test's output is for the test

        return Handler


class TokenFactory:
    """Signs tokens with `key`: good claims by default, any of them overridable.

    Default claims: iss, aud, sub (= `client_id`), iat (now) and exp (now +
    `lifetime_s`). In every method, a keyword argument sets a claim (`exp=...`,
    `nbf=...`, `aud=...`, `scope=...`, any name) and None removes it.
    """

    def __init__(
        self,
        key: SigningKey,
        *,
        issuer: str,
        audience: str,
        client_id: str = "client-1",
        lifetime_s: int = 300,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.client_id = client_id
        self.lifetime_s = lifetime_s

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """The default claims with `overrides` applied (None removes a claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": self.client_id,
            "iat": now,
            "exp": now + self.lifetime_s,
        }
        claims |= overrides
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self,
        *,
        key: SigningKey | None = None,
        alg: str | None = None,
        kid: str | None = None,
        omit_kid: bool = False,
        **claims: Any,
    ) -> str:
        """A signed token: by `key` (default the factory's), with `alg` (default the key's),
        under `kid` (default the key's; `omit_kid` leaves it out of the header)."""
        key = key or self.key
        headers = {} if omit_kid else {"kid": kid or key.kid}
        return jwt.encode(
            self.claims(**claims), key.private_key, algorithm=alg or key.alg, headers=headers
        )

    def alg_none_token(self, **claims: Any) -> str:
        """An unsigned token, header `alg: none` (and the key's kid), empty signature."""
        return _compact({"alg": "none", "typ": "JWT", "kid": self.key.kid}, self.claims(**claims))

    def hs256_with_public_pem_token(self, **claims: Any) -> str:
        """Alg confusion: HS256 keyed with the public key's PEM, which an attacker knows.

        PyJWT refuses to sign this (a PEM is no HMAC secret), so it is assembled here.
        """
        secret = self.key.public_pem()
        return _compact(
            {"alg": "HS256", "typ": "JWT", "kid": self.key.kid},
            self.claims(**claims),
            sign=lambda message: hmac.new(secret, message, hashlib.sha256).digest(),
        )

    def tampered_signature_token(self, **claims: Any) -> str:
        """A good token with one bit of its signature flipped (still valid base64url)."""
        header, payload, signature = self.token(**claims).split(".")
        flipped = bytearray(_b64decode(signature))
        flipped[0] ^= 0x01
        return f"{header}.{payload}.{_b64encode(bytes(flipped))}"

    def tampered_payload_token(self, **claims: Any) -> str:
        """A good token's header and signature around a payload with `claims` changed."""
        header, _, signature = self.token().split(".")
        payload = _b64encode(json.dumps(self.claims(**claims)).encode())
        return f"{header}.{payload}.{signature}"


def _compact(
    header: dict[str, Any],
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes] = lambda message: b"",
) -> str:
    signing_input = ".".join(
        _b64encode(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    return f"{signing_input}.{_b64encode(sign(signing_input.encode()))}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
