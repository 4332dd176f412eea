"""Phantom patients: sampled body habitus and landmark heights, and where the carina lies.

All positions are in the patient frame (mm; +x right, +y anterior, +z superior, origin at
the tracheal bifurcation point). Sizes scale with the patient factor ``f``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Patient:
    """Sampled body habitus and landmark heights (patient frame, mm)."""

    f: float  # size factor
    ac: float  # thoracic cavity semi-axis, right-left
    bc: float  # thoracic cavity semi-axis, anterior-posterior
    wall: float  # chest-wall muscle thickness
    fat: float  # subcutaneous fat thickness
    apex: float  # lung apex height
    dome_right: float
    dome_left: float
    lung_hu: float
    noise_hu: float
    offset: tuple[float, float, float]  # patient frame -> RAS translation

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Patient:
        f = float(rng.uniform(0.85, 1.1))
        dome_right = -95 * f + rng.uniform(-8, 8)
        offset = (rng.uniform(-25, 25), rng.uniform(-25, 25), rng.uniform(-250, 50))
        return cls(f, 125 * f * rng.uniform(0.95, 1.05), 88 * f * rng.uniform(0.9, 1.1), 16 * f,
                   float(rng.uniform(5, 40)), 62 * f + rng.uniform(-6, 6), dome_right,
                   dome_right - rng.uniform(10, 22), float(rng.uniform(-885, -830)), float(rng.uniform(8, 22)),
                   tuple(float(v) for v in offset))

    @property
    def trachea_y(self) -> float:
        return -self.bc + 58 * self.f

    @property
    def spine_y(self) -> float:
        return -self.bc + 16 * self.f

    def width_scale(self, z):
        """Right-left narrowing of the thoracic cavity towards the apex: 0.72 there, 1 from the domes down."""
        return 0.72 + 0.28 * np.clip((self.apex + 20 - z) / (self.apex + 20 - self.dome_right), 0, 1)

    def heart_floor(self) -> float:
        return self.dome_left - 8 * self.f

    def landmarks(self) -> dict[str, float]:
        """Patient-frame S of the planted landmarks (the carina is where the bronchi part)."""
        return {"carina_s": carina_depth(self), "lung_top_s": self.apex, "dome_s": max(self.dome_right, self.dome_left),
                "dome_right_s": self.dome_right, "dome_left_s": self.dome_left}

    def summary(self) -> dict:
        values = asdict(self)
        return {key: round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v] for key, v in values.items()}


BRONCHUS_RADIUS, BRONCHUS_ANGLES_DEG = 7.0, (28.0, 42.0)  # right, left from vertical


def carina_depth(patient: Patient) -> float:
    """S (patient frame) where the two main-bronchus lumens separate in axial sections."""
    right, left = np.deg2rad(BRONCHUS_ANGLES_DEG)
    radius = BRONCHUS_RADIUS * patient.f
    depth = radius * (1 / np.cos(right) + 1 / np.cos(left)) / (np.tan(right) + np.tan(left))
    return float(-depth)
