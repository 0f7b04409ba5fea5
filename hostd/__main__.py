"""``python -m hostd``: the same as the ``hostd`` console script."""

import sys

from hostd.daemon import main

sys.exit(main())
