"""The webhook's TLS without cert-manager: a self-signed CA and a serving certificate for the webhook's
Service, made once and kept in a Secret so every replica serves the same one.

The CA's private key signs the serving certificate and is then thrown away: nobody can mint another
certificate under this CA, and the API server trusts exactly this one (the CA goes into the
MutatingWebhookConfiguration's caBundle). A certificate close to its end is replaced at start-up.

Replicas read the certificate once, at start-up: after one of them renews it, the others still serve
the old certificate until they restart. So the Secret keeps the CAs of replaced certificates
(``previous-ca.crt``) until those certificates expire, and the caBundle holds them beside the current
CA (``ServingCert.ca_bundle``): replacing the bundle with the new CA alone made every other replica
fail the API server's TLS check.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from csi.webhook.kubeapi import ApiError, KubeClient

log = logging.getLogger(__name__)
VALIDITY = dt.timedelta(days=5 * 365)
RENEW_BEFORE = dt.timedelta(days=365)  # replaced at start-up when less than this is left
KEYS = ("ca.crt", "tls.crt", "tls.key")
PREVIOUS_KEY = "previous-ca.crt"  # CAs of replaced certificates some replica may still serve
MAX_PREVIOUS = 4  # the newest ones kept (renewals are years apart; a bound against a Secret that grows)


@dataclass(frozen=True)
class ServingCert:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    previous_ca_pem: bytes = b""  # PEM certificates, newest first

    def previous_cas(self, now: dt.datetime | None = None) -> list[x509.Certificate]:
        """The previous CAs whose certificates may still be served: not yet expired (a CA and the one
        certificate it signed end together)."""
        if not self.previous_ca_pem.strip():
            return []
        now = now or dt.datetime.now(dt.UTC)
        try:
            cas = x509.load_pem_x509_certificates(self.previous_ca_pem)
        except ValueError:
            log.warning("the previous CAs in the webhook's Secret are unreadable: dropping them")
            return []
        return [ca for ca in cas if ca.not_valid_after_utc > now][:MAX_PREVIOUS]

    def ca_bundle(self, now: dt.datetime | None = None) -> bytes:
        """The caBundle: this CA, then the previous ones still in use."""
        pem = serialization.Encoding.PEM
        return self.ca_pem + b"".join(ca.public_bytes(pem) for ca in self.previous_cas(now)
                                      if ca.public_bytes(pem) != self.ca_pem)

    def names(self) -> set[str]:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))}

    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc

    def usable_for(self, names: list[str], now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return set(names) <= self.names() and self.not_after() - now > RENEW_BEFORE

    def write(self, directory: str) -> tuple[str, str]:
        """cert and key files for ssl.SSLContext.load_cert_chain, private to this process's user."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        paths = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
        for path, data in zip(paths, (self.cert_pem, self.key_pem), strict=True):
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return paths


def service_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def generate(names: list[str], now: dt.datetime | None = None) -> ServingCert:
    """A fresh CA and a serving certificate for ``names`` (DNS names or IP addresses) signed by it."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + VALIDITY  # a little slack for skewed clocks
    ca_key, key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"objfs webhook CA {now:%Y-%m-%d}")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ServingCert(ca.public_bytes(pem), cert.public_bytes(pem), key_pem)


def _from_secret(secret: dict[str, object]) -> ServingCert | None:
    data = secret.get("data") or {}
    if not isinstance(data, dict) or not all(data.get(k) for k in KEYS):
        return None
    try:
        previous = base64.b64decode(data.get(PREVIOUS_KEY) or "")
    except (ValueError, TypeError):
        previous = b""
    try:
        ca_pem, cert_pem, key_pem = (base64.b64decode(data[k]) for k in KEYS)
        cert = ServingCert(ca_pem, cert_pem, key_pem, previous)
        cert.names()  # parses
        return cert
    except (ValueError, TypeError, x509.ExtensionNotFound):
        log.warning("the certificate in the webhook's Secret is unreadable: replacing it")
        return None


def _replacing(current: ServingCert | None, fresh: ServingCert, now: dt.datetime) -> ServingCert:
    """``fresh`` that remembers the CAs of ``current`` (its own and its previous ones) while replicas
    that read ``current`` may still serve certificates they signed."""
    if current is None:
        return fresh
    pem = serialization.Encoding.PEM
    try:
        kept = [x509.load_pem_x509_certificate(current.ca_pem), *current.previous_cas(now)]
    except ValueError:
        kept = current.previous_cas(now)
    live = [ca.public_bytes(pem) for ca in kept if ca.not_valid_after_utc > now][:MAX_PREVIOUS]
    return ServingCert(fresh.ca_pem, fresh.cert_pem, fresh.key_pem, b"".join(live))


def ensure_in_secret(kube: KubeClient, namespace: str, secret_name: str, names: list[str]) -> ServingCert:
    """The serving certificate kept in the Secret, made (and stored) if it is missing, unreadable, for
    other names or near its end. Replicas starting together: the one whose write loses (HTTP 409)
    reads the winner's."""
    for _ in range(5):
        secret = kube.secret(namespace, secret_name)
        current = _from_secret(secret)
        now = dt.datetime.now(dt.UTC)
        if current is not None and current.usable_for(names, now):
            return current
        fresh = _replacing(current, generate(names, now), now)
        secret["data"] = {k: base64.b64encode(v).decode() for k, v in zip(KEYS, (fresh.ca_pem, fresh.cert_pem,
                                                                                 fresh.key_pem), strict=True)}
        if fresh.previous_ca_pem:
            secret["data"][PREVIOUS_KEY] = base64.b64encode(fresh.previous_ca_pem).decode()
        try:
            kube.replace_secret(namespace, secret_name, secret)
        except ApiError as e:
            if e.status == 409:
                continue
            raise
        log.info("stored a new webhook serving certificate for %s in Secret %s/%s", ", ".join(names), namespace,
                 secret_name)
        return fresh
    raise ApiError(409, f"Secret {namespace}/{secret_name} kept changing while the certificate was stored")
