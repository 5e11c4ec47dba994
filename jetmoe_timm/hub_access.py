""" Is the Hugging Face Hub reachable? Asked once per process, answered in seconds.

Without a network, every Hub download retries with back-off (about 70 s and a hundred log lines for one
``pretrained=True`` here). ``hub_offline_unless_reachable`` probes the endpoint's TCP port once, with a short
timeout, and when nothing answers runs the block in huggingface_hub's offline mode, in which a download is
answered from the local cache at once, or refused at once. ``HF_HUB_OFFLINE=1`` skips the probe.
"""
import functools
import socket
import urllib.request
from contextlib import contextmanager
from typing import Optional, Tuple
from urllib.parse import urlparse

from huggingface_hub import constants

__all__ = ['hub_offline_mode', 'hub_reachable', 'hub_offline_unless_reachable', 'not_cached_reason']

PROBE_TIMEOUT_S = 3.


def _probe_address(endpoint: str) -> Tuple[str, int]:
    """(host, port) a connection to ``endpoint`` goes to first: the proxy the environment names for its scheme
    (HTTPS_PROXY, ALL_PROXY, ..., unless NO_PROXY exempts the host), as huggingface_hub's client does, else the
    endpoint itself."""
    url = urlparse(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get('all')
    if proxy and not urllib.request.proxy_bypass(url.hostname or ''):
        p = urlparse(proxy if '://' in proxy else f'http://{proxy}')
        return p.hostname, p.port or (443 if p.scheme == 'https' else 80)
    return url.hostname, url.port or (443 if url.scheme == 'https' else 80)


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout: float) -> bool:
    try:
        with socket.create_connection(_probe_address(endpoint), timeout=timeout):
            return True
    except OSError:  # no route, refused, DNS failure, timeout
        return False


def hub_offline_mode() -> bool:
    """Whether huggingface_hub is in offline mode now: ``HF_HUB_OFFLINE``, or inside
    ``hub_offline_unless_reachable`` when the probe failed (so ask outside that block for the user's setting)."""
    return constants.HF_HUB_OFFLINE


def hub_reachable(timeout: float = PROBE_TIMEOUT_S, endpoint: Optional[str] = None) -> bool:
    """Whether the Hub ``endpoint`` (default ``HF_ENDPOINT``) accepts a connection; False in offline mode. Cached
    per endpoint."""
    return not hub_offline_mode() and _reachable(endpoint or constants.ENDPOINT, timeout)


def not_cached_reason() -> str:
    """Why a file that is not in the local cache cannot be downloaded now, when ``hub_reachable()`` says it cannot."""
    return ('HF_HUB_OFFLINE is set and it is not in the local cache' if hub_offline_mode() else
            'the Hub cannot be reached and it is not in the local cache')


@contextmanager
def hub_offline_unless_reachable():
    """Run the block as is when the Hub answers, else in huggingface_hub's offline mode (cache only, no retries)."""
    if hub_reachable():
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
