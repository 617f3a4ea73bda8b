"""Images of task annotations: a reference (named root + relative path), its resolution against the configured
image folders, and the check that lists every missing image before training starts. Images are decoded by the
project's one loader, :func:`cclm.data.images.load_image`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cclm.data.images import MissingImageError


@dataclass(frozen=True, order=True)
class ImageRef:
    """An image as annotations name it: ``root`` is a key of ``data.image_roots`` (None: ``path`` is absolute)."""

    root: str | None
    path: str

    def resolve(self, roots: Mapping[str, str]) -> Path:
        if self.root is None:
            return Path(self.path)
        if self.root not in roots:
            raise KeyError(
                f"config key 'data.image_roots.{self.root}' must be set (folder of the {self.root} images)"
            )
        return Path(roots[self.root]) / self.path


def missing_images(refs: Iterable[ImageRef], roots: Mapping[str, str]) -> list[Path]:
    """Every distinct image among ``refs`` that is not a file, sorted."""
    return sorted({path for path in (ref.resolve(roots) for ref in set(refs)) if not path.is_file()})


def require_images(refs: Iterable[ImageRef], roots: Mapping[str, str], show: int = 20) -> None:
    """Fail before training when images are missing, listing the first ``show`` and the total."""
    missing = missing_images(refs, roots)
    if missing:
        listed = "\n  ".join(str(p) for p in missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise MissingImageError(
            f"{len(missing)} image(s) missing:\n  {listed}{more}\n"
            "(`cclm iglue check-images CONFIG` lists them all; set data.image_roots to your image folders)"
        )
