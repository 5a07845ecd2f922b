"""Profile files: load a YAML profile by path or by shipped name, and write one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.config import ConfigError, load_yaml
from controller.core.errors import ProfileError
from controller.core.profile import Profile, profile_from_dict

# configs/profiles/ of this checkout (the package is installed editable from a clone)
PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "profiles"


def resolve_profile_path(ref: str | Path) -> Path:
    """A path, or the name of a shipped profile (e.g. `llama2-70b-h100-tp8`)."""
    p = Path(ref)
    if p.exists():
        return p
    for cand in (PROFILES_DIR / f"{ref}.yaml", PROFILES_DIR / str(ref)):
        if cand.exists():
            return cand
    shipped = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
    raise ProfileError(f"profile={str(ref)!r}: no such file, and not a shipped profile (shipped: {', '.join(shipped)})")


def load_profile_raw(ref: str | Path) -> dict[str, Any]:
    path = resolve_profile_path(ref)
    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise ProfileError(str(e)) from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    return raw


def load_profile(ref: str | Path) -> Profile:
    path = resolve_profile_path(ref)
    return profile_from_dict(load_profile_raw(path), origin=str(path))


def write_profile(raw: dict[str, Any], out: Path, header: str = "") -> None:
    """Write a profile YAML, validating it first so a bad file is never written."""
    profile_from_dict(raw, origin=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    out.write_text((header + "\n" if header else "") + body)
