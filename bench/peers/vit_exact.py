"""`vit` with full JPEG decoding in predict, for a vit that predates `--fast-decode` (where
draft decoding was the default and no flag turned it off). bench/e2e.py uses it only then.

    python bench/peers/vit_exact.py predict FOLDER ...
"""

import dataclasses
import sys

from vitcli.cli import main
from vitcli.services import predict

_run = predict.run


def _exact(options, *args, **kwargs):
    return _run(dataclasses.replace(options, draft=False), *args, **kwargs)


predict.run = _exact
sys.argv[0] = "vit"
main()
