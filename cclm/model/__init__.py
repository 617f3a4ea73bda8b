"""The cross-view model: open_clip vision tower + XLM-R text and fusion stacks + heads."""

from cclm.model.cross_view import CrossViewModel

__all__ = ["CrossViewModel"]
