"""How a TLS peer's certificate subject is named: one table for every place that shows or
matches one.

`ssl.SSLSocket.getpeercert()` spells the subject's attributes in full ("commonName"); people
write them short, as in RFC 4514 ("CN"). The server names its peer with `subject_text()` (in
logs and refusals) and pubmon.config.access matches the subjects of allow lists with the same
`SUBJECT_ATTRS`, so a subject reads alike wherever it appears. Imports nothing (pubmon.config,
above, imports it; the thrift server, beside it, too).
"""

from __future__ import annotations

__all__ = ["SUBJECT_ATTRS", "subject_text"]

from collections.abc import Iterable

# Subject attribute names as getpeercert() spells them -> as people write them.
SUBJECT_ATTRS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
}


def subject_text(rdns: Iterable[tuple[str, str]]) -> str:
    """A subject's (attribute, value) pairs, in certificate order, as "CN=a,O=b"."""
    return ",".join(f"{SUBJECT_ATTRS.get(k, k)}={v}" for k, v in rdns)
