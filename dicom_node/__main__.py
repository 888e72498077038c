"""`python -m dicom_node ...` — the same `radvlm` command line."""

import sys

from dicom_node.cli import main

sys.exit(main())
