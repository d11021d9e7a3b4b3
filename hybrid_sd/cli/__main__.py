"""``python -m hybrid_sd.cli``: the ``hybrid-sd`` command, as ``cluster up`` starts its servers."""

import sys

from hybrid_sd.cli import main

sys.exit(main())
