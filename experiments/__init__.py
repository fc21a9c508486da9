"""Thin absl entry points over jaxpost: `python -m experiments.<name> --flags`."""

import sys

# While `python -m experiments.<name>` imports this package, before the main's own imports,
# Python holds sys.argv[0] at "-m": the moment for the main's process to restart itself once
# with glibc's malloc on huge pages (jaxpost.hostmem; JAXPOST_HUGE_PAGES=0 keeps the defaults).
if sys.argv[:1] == ["-m"]:
    from jaxpost import hostmem

    hostmem.reexec()
