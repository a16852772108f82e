"""Eager reference of the low-rank token embedding (SPEC §3).

    embed(ids) = embed_low[ids] · project_upᵀ      embed_low [V, r], project_up [d, r]
"""
from __future__ import annotations

import torch.nn.functional as F


def embedding(ids, embed_low, project_up):
    return F.embedding(ids, embed_low).to(project_up.dtype) @ project_up.t()
