"""What a reload did: kept apart from loading.py, so that a worker, which takes the result of a
reload its supervisor validated, never loads the validator (pydantic: about 12 MiB each)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReloadResult:
    """The generation in service after a reload, and why it was refused (or what to heed)."""

    ok: bool
    generation: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
