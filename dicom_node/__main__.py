"""`python -m dicom_node serve|jobs|outbox` — the node subcommands without the full CLI."""

import sys

from dicom_node.commands import main

sys.exit(main())
