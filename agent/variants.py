"""Which of a bundle's artifacts this device runs: a pure ranking of variants, or every
member of a composite declaration."""

from __future__ import annotations

from collections.abc import Collection

from bundle.manifest import ArtifactVariant, Manifest
from firmware_profiles.model import Profile

from .errors import InstallError

__all__ = ["choose_variant", "composite_members"]

# Without a profile the device is a generic CPU: prefer what every CPU runs exactly.
_GENERIC_FORMATS = ("onnx", "tflite")
_GENERIC_DTYPES = ("fp32", "int8", "fp16", "int8-full")


def choose_variant(manifest: Manifest, profile: Profile | None,
                   formats: Collection[str]) -> ArtifactVariant:
    """The best variant for a device of ``profile`` that has runtimes for ``formats``.

    Variants made for this profile come first, then profile-neutral ones; within those the
    profile's format and dtype preferences decide. Variants made for another profile are
    never chosen: their quantization may rely on instructions this device lacks. Raises
    InstallError(``no_variant``) naming what the bundle offers when nothing fits.
    """
    name = profile.name if profile else None
    prefer_formats = profile.formats if profile else _GENERIC_FORMATS
    prefer_dtypes = profile.dtypes if profile else _GENERIC_DTYPES

    def usable(a: ArtifactVariant) -> bool:
        return (a.profile in (None, name) and a.format in formats
                and a.format in prefer_formats and a.dtype in prefer_dtypes)

    candidates = [a for a in manifest.artifacts if usable(a)]
    if not candidates:
        offered = ", ".join(f"{a.path} ({a.format} {a.dtype}, profile {a.profile or 'any'})"
                            for a in manifest.artifacts)
        raise InstallError("no_variant", f"{manifest.name} v{manifest.version} has no artifact "
                           f"this device can run (profile {name or 'none'}, runtimes for "
                           f"{', '.join(sorted(formats)) or 'nothing'}); it offers {offered}")
    return min(candidates, key=lambda a: (a.profile != name, prefer_formats.index(a.format),
                                          prefer_dtypes.index(a.dtype)))


def composite_members(manifest: Manifest, profile: Profile | None,
                      formats: Collection[str]) -> tuple[ArtifactVariant, ...]:
    """The artifacts of ``manifest``'s composite declaration, in member order.

    Every member runs, so there is no choice to make, only a check: each must be made for
    no profile or this device's, in a format it has a runtime for. InstallError
    (``no_variant``) naming the first member that is not.
    """
    assert manifest.composite is not None
    by_path = {a.path: a for a in manifest.artifacts}
    name = profile.name if profile else None
    members = tuple(by_path[path] for path in manifest.composite.members)
    for member in members:
        if member.profile not in (None, name) or member.format not in formats:
            raise InstallError("no_variant", f"{manifest.name} v{manifest.version} is a "
                               f"{manifest.composite.kind} whose member {member.path} "
                               f"({member.format}, profile {member.profile or 'any'}) this "
                               f"device cannot run (profile {name or 'none'}, runtimes for "
                               f"{', '.join(sorted(formats)) or 'nothing'})")
    return members
