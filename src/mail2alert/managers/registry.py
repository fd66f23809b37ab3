"""The registry of manager types: the ``name`` a configuration's manager entry may have.

The one place that names every manager type; adding one is one line here.
"""

from __future__ import annotations

from collections.abc import Mapping

from mail2alert.gocd.manager import GOCD
from mail2alert.managers.base import ManagerType
from mail2alert.managers.mail import MAIL

MANAGER_TYPES: Mapping[str, ManagerType] = {m.name: m for m in (GOCD, MAIL)}
