"""Where each verb group plugs into the CLI. Keep these imports light: heavy ones go inside handlers."""

from __future__ import annotations

REGISTRY: list = []
