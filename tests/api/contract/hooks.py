"""Schemathesis hooks for the contract run: uploads draw real bundles as well as arbitrary bytes.

Arbitrary bytes only ever reach the bundle validator's refusals; a share of real bundles (made by the test
for the tiny backbone, in `CONTRACT_BUNDLES`) gets uploads to succeed, so that the stateful phase follows
the upload's links to describe, activate, predict and delete the new version.
"""

from __future__ import annotations

import os
from pathlib import Path

import schemathesis
from hypothesis import strategies as st

BUNDLES = sorted(Path(os.environ["CONTRACT_BUNDLES"]).glob("*.safetensors")) if "CONTRACT_BUNDLES" in os.environ else []


@schemathesis.hook
def before_generate_body(context, strategy):
    op = context.operation
    if op is None or op.path != "/adapters" or op.method.upper() != "POST" or not BUNDLES:
        return strategy
    real = st.sampled_from([p.read_bytes() for p in BUNDLES]).map(lambda data: {"file": data})
    return st.one_of(real, strategy)
