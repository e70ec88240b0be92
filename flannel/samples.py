"""Real sample files shipped by installed packages, for the demo and the tests.

    python -c "from flannel.samples import real_chest_dicom; print(real_chest_dicom())"
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# A real chest radiograph in the PyPI package pydicom-data (import name data_store):
# CR, MONOCHROME1, 1955 x 1841, 15 bits stored.
CHEST_DICOM_NAME = "RG1_UNCR.dcm"


def real_chest_dicom() -> Path | None:
    """Path of ``RG1_UNCR.dcm`` from pydicom-data, or None when the package is not installed."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / CHEST_DICOM_NAME
        if path.is_file():
            return path
    return None
