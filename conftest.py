"""Repository-wide pytest set-up (the packages' own conftest files hold their fixtures).

With ``--import-mode=importlib`` pytest names a test module after its path (``neco/tests/test_x.py`` becomes
``neco.tests.test_x``) and, when the parent name is not imported yet, registers the source folder ``neco/`` as a
namespace package that hides the installed ``neco``. Importing the installed packages first prevents that.
"""

import importlib
import os

import torch

PACKAGES = ("funai_common", "sharelock", "pin", "neco", "fungi", "counting", "dora")

for _name in PACKAGES:
    try:
        importlib.import_module(_name)
    except ImportError:  # a package that is not installed has no tests to run either
        pass

# Tiny models run fastest single-threaded, and the suite (its 2-process tests included, which inherit the variable)
# must not oversubscribe a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
