"""`python -m controller.agent.compose_keys DIR`: the key pairs a docker-compose stack needs, once.

Writes DIR/agent.key{,_secret} (the agents' pair), DIR/controller.key{,_secret} (the controller's pair),
DIR/tap.key{,_secret} (the tap's pair, for its CURVE PUB socket) and DIR/authorized/controller.key (the
agents and the tap trust the controller), unless they already exist.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from controller.agent.keys import generate


def ensure_keys(d: Path) -> None:
    for name in ("agent", "controller", "tap"):
        if not (d / f"{name}.key_secret").exists():
            generate(d, name)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "controller.key", d / "authorized" / "controller.key")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m controller.agent.compose_keys DIR")
    ensure_keys(Path(sys.argv[1]))
    print(f"CURVE keys ready in {sys.argv[1]}")
