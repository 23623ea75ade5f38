"""The `[consumers.NAME]` tables, in the config and in the credentials file `[admission]` names: each consumer's
scopes, its credentials (API keys and passwords as hashes only; client certificates by one field each, read into
(field, value), no certificate claimed by two consumers) and its own limits.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from types import MappingProxyType
from typing import ClassVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.auth.settings.model import API_KEY_HASH, CONSUMER_NAME, CertificateIdentity, Consumer
from gateway.auth.settings.values import named_file, rate_limit, scope_set
from gateway.config.values import Invalid, Table, describe, nonempty_string, positive_int, string_list

__all__ = ["CERTIFICATE_FIELDS", "read_consumers", "read_credentials_file"]

_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _api_key_hashes(value: object) -> frozenset[str]:
    hashes = string_list(value) if value != [] else ()
    for item in hashes:
        if not API_KEY_HASH.fullmatch(item):
            raise ValueError(
                'must hold hashes such as "sha256:9f86d0...", as `gateway-credentials api-key` prints them, never '
                "a key itself"
            )
    return frozenset(hashes)


def _password_hash(value: object) -> bytes:
    text = nonempty_string(value)
    if not _BCRYPT_HASH.fullmatch(text):
        raise ValueError(
            'must be a bcrypt hash ("$2b$12$..."), as `gateway-credentials password` prints it, never a password'
        )
    return text.encode("ascii")


_CONSUMER_KEYS = ("scopes", "api_keys", "password", "rate_limit", "max_concurrent", "client_certificates")


def _consumer(name: str, t: Table) -> Consumer:
    t.known(_CONSUMER_KEYS)
    if not CONSUMER_NAME.fullmatch(name):
        raise t.error("", "a consumer name may contain only letters, digits and -_. (at most 128)")
    rate = t.table("rate_limit")
    consumer = Consumer(
        name=name,
        scopes=t.get("scopes", scope_set, frozenset()),
        api_key_hashes=t.get("api_keys", _api_key_hashes, frozenset()),
        password_hash=t.require("password", _password_hash) if t.has("password") else None,
        rate_limit=rate.attempt(rate_limit) if rate is not None else None,
        max_concurrent=t.require("max_concurrent", positive_int) if t.has("max_concurrent") else None,
        client_certificates=t.get("client_certificates", _certificate_identities, frozenset()),
    )
    t.finish()
    return consumer


class _AnyCase(Mapping[str, x509.ObjectIdentifier]):
    """Attribute type names of a DN, whatever their case (RFC 4514 section 3: "cn" is "CN"), with OpenSSL's names
    of the attributes cryptography writes as OIDs: for `x509.Name.from_rfc4514_string`."""

    _NAMES: ClassVar[dict[str, x509.ObjectIdentifier]] = {
        "CN": NameOID.COMMON_NAME,
        "L": NameOID.LOCALITY_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "STREET": NameOID.STREET_ADDRESS,
        "DC": NameOID.DOMAIN_COMPONENT,
        "UID": NameOID.USER_ID,
        "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
        "SERIALNUMBER": NameOID.SERIAL_NUMBER,
        # The other names OpenSSL's RFC 2253 output uses (cryptography writes these as OIDs, parsed the same).
        "GN": NameOID.GIVEN_NAME,
        "SN": NameOID.SURNAME,
        "TITLE": NameOID.TITLE,
        "INITIALS": NameOID.INITIALS,
        "GENERATIONQUALIFIER": NameOID.GENERATION_QUALIFIER,
        "DNQUALIFIER": NameOID.DN_QUALIFIER,
        "PSEUDONYM": NameOID.PSEUDONYM,
        "ORGANIZATIONIDENTIFIER": NameOID.ORGANIZATION_IDENTIFIER,
        "POSTALCODE": NameOID.POSTAL_CODE,
        "BUSINESSCATEGORY": NameOID.BUSINESS_CATEGORY,
        "JURISDICTIONC": NameOID.JURISDICTION_COUNTRY_NAME,
        "JURISDICTIONST": NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME,
        "JURISDICTIONL": NameOID.JURISDICTION_LOCALITY_NAME,
    }

    def __getitem__(self, name: str) -> x509.ObjectIdentifier:
        return self._NAMES[name.upper()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


_ANY_CASE = _AnyCase()


def _subject_dn(value: str) -> str:
    """A subject DN in the form a certificate's is compared in: parsed, then written back (so "CN=a\\2cb" and
    "CN=a\\,b", or "cn=" and "CN=", are one DN)."""
    try:
        return x509.Name.from_rfc4514_string(value, _ANY_CASE).rfc4514_string()
    except ValueError:
        raise ValueError(
            f'{value!r} is not a subject DN in RFC 4514 form: most specific first, no spaces around "," or '
            '"=", such as "CN=billing,O=Example" (`openssl x509 -noout -subject -nameopt RFC2253` prints it so)'
        ) from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


CERTIFICATE_FIELDS: Mapping[str, Callable[[str], str]] = MappingProxyType(
    {
        "cn": lambda value: value,
        "dn": _subject_dn,
        "dns": str.lower,
        "email": str.lower,
        "uri": lambda value: value,
        "ip": _ip,
    }
)
"""The fields a consumer's `client_certificates` may name ("cn:billing"), each with how its value is normalised:
a CN (of the subject; exact), the whole subject DN, and the subjectAltNames (DNS names and email addresses
whatever their case, URIs exact, IP addresses in their usual form). Each matches its own field only."""


def _certificate_identity(text: str) -> CertificateIdentity:
    """One entry of `client_certificates`: "field:value" (the field in any case, so "DNS:", "URI:" and "IP:" read
    as before), or a bare subject DN ("CN=billing,O=Example", read as "dn:")."""
    field, sep, value = text.partition(":")
    field = field.lower()
    if not sep or field not in CERTIFICATE_FIELDS:
        if "=" not in text:
            raise ValueError(
                f"{text!r} names no certificate field: write cn:NAME (the subject's CN), dn:DN (the whole subject), "
                "dns:NAME, email:ADDRESS, uri:URI or ip:ADDRESS (a subjectAltName)"
            )
        field, value = "dn", text
    if not value:
        raise ValueError(f"{text!r} names nothing after {field}:")
    if value != value.strip():
        raise ValueError(f"{text!r} has white space around its {field} (it would never match)")
    return field, CERTIFICATE_FIELDS[field](value)


def _certificate_identities(value: object) -> frozenset[CertificateIdentity]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            'must be a non-empty array such as ["cn:billing"], ["dns:billing.internal", '
            f'"dn:CN=billing,O=Example"], got {describe(value)}'
        )
    return frozenset(_certificate_identity(text) for text in value)


def read_consumers(top: Table, into: dict[str, Consumer]) -> None:
    claimed = {identity: c.name for c in into.values() for identity in c.client_certificates}
    for name, table in top.named_tables("consumers"):
        if name in into:
            table.report("", f"consumer {name!r} is declared twice (in the config and the credentials file)")
            continue
        consumer = table.attempt(partial(_consumer, name))
        if consumer is None:
            continue
        into[name] = consumer
        for identity in sorted(consumer.client_certificates):
            other = claimed.setdefault(identity, name)
            if other != name:
                table.report(
                    "client_certificates",
                    f"{':'.join(identity)} is claimed by consumer {other!r} too: a certificate proves one consumer",
                )


def read_credentials_file(t: Table, into: dict[str, Consumer]) -> None:
    try:
        path, data = named_file(t, "credentials_file")
    except Invalid:
        return
    try:
        decoded = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        t.errors.add(path, "", f"not valid TOML: {e}")
        return
    top = Table(decoded, "", path, t.errors)
    top.known(("consumers",))
    read_consumers(top, into)
    top.finish()
