"""The registry of manager types: the ``name`` a configuration's manager entry may have."""

from __future__ import annotations

from collections.abc import Mapping

from mail2alert.managers.base import ManagerType
from mail2alert.managers.gocd import GOCD
from mail2alert.managers.mail import MAIL

MANAGER_TYPES: Mapping[str, ManagerType] = {m.name: m for m in (GOCD, MAIL)}

__all__ = ["MANAGER_TYPES", "ManagerType"]
