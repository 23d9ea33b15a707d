"""Host names against the config's allow-lists (`http.allowed_hosts`, `inputs.url_allowed_hosts`,
`queue.webhook_allowed_hosts`): one matching rule for all of them."""

from __future__ import annotations


def host_matches(host: str, patterns: list[str], star_matches_any: bool = True) -> bool:
    """An exact name, or '.example.com' for its subdomains; '*' for any host where the list allows it (the
    webhook list does not: every destination there is named)."""
    return any(
        (star_matches_any and pattern == "*") or host == pattern or (pattern.startswith(".") and host.endswith(pattern))
        for pattern in patterns
    )
