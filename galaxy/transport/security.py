"""The cluster's certificate authority and per-device keys, for mutually authenticated TLS.

`galaxy keys init DIR --device NAME ...` makes a CA and one key pair per device (plus one for the
coordinator). Every certificate carries the DNS name CLUSTER_NAME, which clients check instead of
the peer's address (addresses of edge devices change; the CA signature is what authenticates),
and the device's own name. A peer is accepted only if its certificate is signed by this CA:
workers require client certificates, and clients verify the worker's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthError

CLUSTER_NAME = "galaxy.cluster"  # the name every certificate is issued for (target name override)
COORDINATOR = "coordinator"


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of the CA certificate and one identity (certificate + private key)."""

    ca: bytes
    cert: bytes
    key: bytes
    name: str

    @classmethod
    def load(cls, directory: str | Path, name: str) -> TlsFiles:
        d = Path(directory)
        paths = {"ca": d / "ca.pem", "cert": d / f"{name}.pem", "key": d / f"{name}.key"}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise AuthError(f"TLS files missing: {', '.join(missing)}; create them with "
                            f"`galaxy keys init {d} --device {name}`")
        return cls(paths["ca"].read_bytes(), paths["cert"].read_bytes(), paths["key"].read_bytes(), name)


def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Galaxy cluster")])


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def init_keys(directory: str | Path, devices: list[str], hosts: list[str] | None = None, days: int = 825) -> list[Path]:
    """Create (or extend) a cluster CA in `directory` and a key pair for each device name.

    An existing CA is reused so devices can be added later; existing device keys are kept.
    hosts: extra DNS names / IP addresses to put in every certificate (optional).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    key_fmt = (pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if (d / "ca.pem").exists() and (d / "ca.key").exists():
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("Galaxy cluster CA")
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write_private(d / "ca.key", ca_key.private_bytes(*key_fmt))
        (d / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    written = []
    for name in dict.fromkeys([*devices, COORDINATOR]):
        if (d / f"{name}.pem").exists() and (d / f"{name}.key").exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list = [x509.DNSName(CLUSTER_NAME), x509.DNSName(name)]
        for h in hosts or []:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(d / f"{name}.key", key.private_bytes(*key_fmt))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        written.append(d / f"{name}.pem")
    return written
