"""Former home of the fused Triton kernel, kept so that existing imports keep working.

The kernels now live in ``labo_hf.kernels.triton_rows`` (forward statistics and backward gradient as
two kernels); ``triton_fused_rows`` runs both.
"""

from __future__ import annotations

from labo_hf.kernels.triton_rows import INTERPRETED, supports, triton_fused_rows

__all__ = ["INTERPRETED", "supports", "triton_fused_rows"]
