"""A small synthetic chest CT (HU) for the offline demo: body, lungs with vessels, heart,
aorta, spine, and a right pleural effusion. Not a phantom with ground truth (see issue 8)."""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.io.volume import Volume


def synthetic_chest_ct(shape: tuple[int, int, int] = (128, 112, 96), spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.5),
                       seed: int = 0) -> Volume:
    """Return an int16 RAS volume of a crude chest, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    x, y, z = [np.asarray(a) for a in np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing_mm)],
                                                  indexing="ij")]
    ct = np.full(shape, -1000.0)
    ct[(x / 165) ** 2 + (y / 115) ** 2 < 1] = 30.0  # body (soft tissue)
    ct[(x / 160) ** 2 + (y / 110) ** 2 < 1 - 0.08] = -90.0  # fat layer inside skin
    ct[(x / 150) ** 2 + (y / 100) ** 2 < 0.85] = 35.0
    for side in (-1, 1):  # lungs: R is +x in RAS, so side=+1 is the patient's right lung
        lung = ((x - side * 70) / 58) ** 2 + ((y + 5) / 78) ** 2 + ((z - 20) / 150) ** 2 < 1
        ct[lung] = -860.0
    ct[((x + 20) / 55) ** 2 + ((y - 35) / 45) ** 2 + ((z + 40) / 55) ** 2 < 1] = 40.0  # heart
    ct[((x + 5) / 14) ** 2 + ((y + 10) / 14) ** 2 < 1] = 45.0  # aorta
    ct[(x / 22) ** 2 + ((y + 75) / 20) ** 2 < 1] = 500.0  # spine
    effusion = (((x - 70) / 58) ** 2 + ((y + 5) / 78) ** 2 < 1) & (y < -50) & (z < 0)
    ct[effusion] = 12.0  # right pleural effusion, dependent
    ct += rng.normal(0, 15, shape)
    ijk_to_ras = np.diag([*spacing_mm, 1.0])
    ijk_to_ras[:3, 3] = [-(n / 2) * s for n, s in zip(shape, spacing_mm)]
    return Volume.from_array(ct.astype(np.int16), ijk_to_ras, name="synthetic_chest")
