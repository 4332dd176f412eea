"""Summary picture: slices shown in radiological orientation whatever the storage order."""

from __future__ import annotations

import numpy as np
import pytest

from COLIPRISlicerLib.export.summary_figure import _in_display_order
from COLIPRISlicerLib.io.volume import Volume


@pytest.mark.parametrize("diagonal, expected", [((1.0, 1.0, 1.0), (3, 0)), ((-1.0, -1.0, 1.0), (0, 2))])
def test_axial_slice_puts_patient_right_on_the_left_and_anterior_up(diagonal, expected):
    """Display axes: 0 runs from the patient's right (image left) to left, 1 from posterior up to anterior."""
    array = np.full((4, 3, 2), -1000, np.int16)
    array[0, 0, :] = 1  # RAS storage: most left and posterior voxel; LPS storage: most right and anterior
    volume = Volume.from_array(array, np.diag([*diagonal, 1.0]), name="orientation")
    plane = _in_display_order(volume, volume.array[:, :, 0], array_axis=2)
    assert tuple(np.argwhere(plane == 1)[0]) == expected


def test_permuted_storage_is_transposed_into_display_order():
    array = np.full((3, 5, 4), -1000, np.int16)  # stored axes: A, R, S
    array[2, 0, :] = 1
    ijk_to_ras = np.array([[0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    volume = Volume.from_array(array, ijk_to_ras, name="permuted")
    plane = _in_display_order(volume, volume.array[:, :, 1], array_axis=2)
    assert plane.shape == (5, 3)  # (R, A)
    assert tuple(np.argwhere(plane == 1)[0]) == (0, 2)  # R index 0 is the most right: image left; A = 2: top


def test_writing_the_summary_leaves_the_process_matplotlib_backend_alone(tiny_engine, tmp_path):
    """Slicer's Python uses a Qt backend for its own plots: the picture must not switch it to Agg."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import matplotlib; matplotlib.use('svg');"
        "from COLIPRISlicerLib.io.sample_volume import synthetic_chest_ct as make;"
        "from COLIPRISlicerLib.encoding.engine import Engine; from COLIPRISlicerLib.analysis import Analyzer;"
        "from COLIPRISlicerLib.export.summary_figure import write_summary_png;"
        "engine = Engine(sys.argv[2], device='cpu', precision='fp32');"
        "write_summary_png(Analyzer(engine).analyze(make()), sys.argv[3]);"
        "print(matplotlib.get_backend())"
    )
    out = tmp_path / "summary.png"
    completed = subprocess.run([sys.executable, "-c", code, str(REPO / "COLIPRISlicer"), tiny_engine.spec, str(out)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[0] == "svg"
    from PIL import Image

    assert Image.open(out).size == (1300, 650)
