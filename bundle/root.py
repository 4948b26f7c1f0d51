"""The fleet's root metadata (``root.json``), checked before anyone pins or serves it.

The root is what every device trusts first: a garbage or forged one pinned by an agent makes
it refuse every real bundle, and one served by the fleet server at enrollment does the same
to every new device. Both sides check it here, the same way.
"""

from __future__ import annotations

from typing import Any

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from .errors import InvalidRootError

__all__ = ["check_root"]


def check_root(data: bytes, source: str) -> Metadata[Root]:
    """The root metadata in ``data`` if it is signed by a threshold of its own root keys.

    ``source`` names where it came from, for the message of the InvalidRootError raised
    otherwise (not TUF metadata, metadata of another role, or not signed by its own keys).
    """
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except RepositoryError as exc:
        raise InvalidRootError(f"{source} is not TUF metadata ({exc}); use the fleet's "
                               "root.json (`fleet keys init` writes it as KEYS/root.json)") \
            from exc
    if not isinstance(md.signed, Root):
        raise InvalidRootError(f"{source} is {md.signed.type} metadata, not root; use the "
                               "fleet's root.json")
    result = md.signed.get_verification_result(Root.type, md.signed_bytes, md.signatures)
    if not result.verified:
        raise InvalidRootError(f"{source} is not signed by its own root keys "
                               f"({len(result.signed)} valid of threshold {result.threshold}); "
                               "it is damaged or forged: copy root.json from the fleet's keys "
                               "again")
    return md
