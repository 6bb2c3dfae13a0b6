"""Limits on what clients may send (uploads, archives), in one frozen place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UploadLimits:
    max_upload_bytes: int = 256 * 1024 * 1024
    max_extracted_bytes: int = 1024 * 1024 * 1024
    max_entries: int = 20_000
