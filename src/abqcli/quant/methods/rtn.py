"""`calibration.method: rtn`: every weight rounded to nearest as it is (no transform, no training)."""

from __future__ import annotations

from abqcli.quant.methods import NEAREST, CalibrationMethod


class RtnMethod(CalibrationMethod):
    """Round to nearest: the base class's `fold` with nothing to prepare or train."""

    roundings = (NEAREST,)
