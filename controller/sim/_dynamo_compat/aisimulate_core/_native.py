"""Stand-in for `aisimulate_core._native`: config normalisation only (used by Dynamo's config validation)."""

from __future__ import annotations

import json


class RustForwardPassPerfModel:
    @staticmethod
    def normalize_config(config_json: str) -> str:
        cfg = json.loads(config_json)
        if cfg.get("estimation_mode", "fpm_regression") != "fpm_regression":
            raise ValueError("the aisimulate_core stand-in supports estimation_mode='fpm_regression' only")
        return json.dumps(cfg, sort_keys=True)
