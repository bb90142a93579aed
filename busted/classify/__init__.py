"""Pure classification: DNS and TLS ClientHello parsers, the provider catalog, name caches.

Nothing here does I/O or reads the clock (timestamps are passed in), so it runs without root and
from a notebook on recorded bytes.
"""

from busted.classify.cache import Classification, Classifier, NameCache, NameEntry
from busted.classify.dns import DnsInfo, TcpDnsFramer, parse_dns
from busted.classify.providers import CATEGORIES, Catalog, Provider, ProviderMatch
from busted.classify.tls import NEED_MORE, ClientHelloInfo, ClientHelloParser, NeedMore, NotTls, ja4

__all__ = [
    "CATEGORIES",
    "Catalog",
    "Classification",
    "Classifier",
    "ClientHelloInfo",
    "ClientHelloParser",
    "DnsInfo",
    "NEED_MORE",
    "NameCache",
    "NameEntry",
    "NeedMore",
    "NotTls",
    "Provider",
    "ProviderMatch",
    "TcpDnsFramer",
    "ja4",
    "parse_dns",
]
