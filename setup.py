"""The package list for setuptools; everything else is configured in pyproject.toml.

The data folders ``resources/`` and ``checkpoints/`` live at the top of the repository and
install as the data sub-packages ``fewshot_studio.resources`` and ``fewshot_studio.checkpoints``
(mapped with ``[tool.setuptools.package-dir]`` in pyproject.toml). pyproject.toml cannot join
discovered packages with mapped ones, so they are joined here: every code package under
``fewshot_studio/`` (found, so a new sub-package needs no edit) plus the two data packages.
"""

import warnings

from setuptools import find_packages, setup

DATA_PACKAGES = ["fewshot_studio.resources", "fewshot_studio.checkpoints"]

# Their sub-folders (resources/demo/photos, ...) are data, shipped by the package-data globs,
# not packages: silence setuptools' warning that they are "absent from `packages`".
warnings.filterwarnings("ignore", message=r"Package 'fewshot_studio\.(resources|checkpoints)\.")
# `pip install -e .` (make setup): the generic notice that an editable install maps folders,
# printed on every set-up; fewshot_studio.paths finds the data folders there (tested).
warnings.filterwarnings("ignore", message=r"Editable installation\.")

setup(packages=[*find_packages(include=["fewshot_studio", "fewshot_studio.*"]), *DATA_PACKAGES])
