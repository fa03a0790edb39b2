"""The README documents every setting (and nothing that no longer exists)."""

from __future__ import annotations

import re

from service.settings import ServiceSettings
from tests.conftest import REPO


def test_readme_settings_table_matches_the_settings_model():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `ADAPTER_SERVICE_([A-Z0-9_]+)` \|", readme, flags=re.M))
    fields = {name.upper() for name in ServiceSettings.model_fields}
    assert documented == fields, {"undocumented": fields - documented, "stale": documented - fields}


def test_every_setting_has_a_description():
    missing = [n for n, f in ServiceSettings.model_fields.items() if not f.description]
    assert missing == []
