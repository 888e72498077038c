"""Long reliability drivers (not collected by pytest: file names do not start with test_); run
from documented commands in docs/reliability.md."""
