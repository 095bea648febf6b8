"""The OCI bundle's runtime spec, read the one way every part of Kybernate reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kybernate.errors import InvalidArgument


def load_spec(bundle: Path) -> dict[str, Any]:
    """bundle/config.json as a dict, with errors that name the file."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"OCI bundle {bundle} has no config.json") from None
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read OCI spec {path}: {err}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"OCI spec {path} is not a JSON object")
    return spec
