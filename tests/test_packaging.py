"""Packaging: the ``all`` extra installs every optional feature."""

from __future__ import annotations

import re
from importlib.metadata import metadata

DEVELOPMENT_EXTRAS = {"test", "dev"}  # for working on kvtier, not features of it


def test_all_extra_names_every_feature_extra() -> None:
    md = metadata("kvtier")
    extras = set(md.get_all("Provides-Extra") or [])
    assert "all" in extras
    features = extras - DEVELOPMENT_EXTRAS - {"all"}
    assert features >= {"torch", "vllm", "plot"}
    covered: set[str] = set()
    for req in md.get_all("Requires-Dist") or []:
        if re.search(r"""extra\s*==\s*["']all["']""", req):
            m = re.match(r"kvtier\[([^\]]+)\]", req.strip())
            assert m, f"the all extra should name kvtier's own extras, not copy them: {req}"
            covered |= {e.strip() for e in m.group(1).split(",")}
    assert covered == features
